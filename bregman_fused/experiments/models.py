"""The paper's models, written from their descriptions (docs/design.md §1 and the paper's experiments).

``MLP``          fully connected, ReLU; 784-200-80-10 on MNIST, 64-200-80-10 on scikit-learn's digits.
``ConvNet``      conv 64-64 5×5 + FC 1024-128-10 (the paper's Fashion-MNIST net).
``ResNet18``     the usual CIFAR-10 ResNet-18 (3×3 stem, no max-pool, 4 stages of 2 basic blocks).
``VGG``          VGG-11/13/16 with BatchNorm after every conv, CIFAR-style: 32×32 inputs, five 2×2
                 max-pools down to 1×1×512, one Linear(512, classes). Convs have no bias (the BN
                 shift that follows takes its place). MNIST is padded to 32×32 by the data pipeline
                 (``input_size``).
``SkipAutoencoder``  the architecture-search denoiser: ``depth`` Linear(n, n) layers where layer i
                 also adds a learnable weighted sum of *all* earlier outputs (its ``skips`` vector, one
                 scalar per earlier output, initialised to 0). An L1 penalty on the skips lets the
                 Bregman iteration switch skip connections on one by one.
``DenseNet``     the architecture-search classifier: a 3×3 stem conv, a dense block whose layers see
                 the concatenation of all earlier feature maps, a 1-channel transition conv and one
                 Linear on that channel's pixels. Group sparsity on the conv kernels decides which of
                 the dense connections survive.

Inputs are normalised by the data pipeline (``experiments.data``), not inside the models.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "ConvNet", "ResNet18", "VGG", "VGG_LAYERS", "SkipAutoencoder", "DenseNet", "MODELS", "build_model",
           "input_size"]


class MLP(nn.Module):
    def __init__(self, sizes: Sequence[int] = (64, 200, 80, 10), activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(activation())
        self.layers = nn.Sequential(*layers)
        self.in_features = sizes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.reshape(x.shape[0], -1))


class ConvNet(nn.Module):
    """conv(1→64, 5×5) → ReLU → maxpool 2 → conv(64→64, 5×5) → ReLU → maxpool 2 → FC 1024-128-10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _ResBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or n_in != n_out:  # 1×1 projection where the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(n_in, n_out, 1, stride=stride, bias=False), nn.BatchNorm2d(n_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 11.2 M parameters, 32×32 inputs."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, n_in = [], width
        for i, n_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_ResBlock(n_in, n_out, stride), _ResBlock(n_out, n_out, 1)))
            n_in = n_out
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(n_in, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# output channels of the 3×3 convs, "M" = 2×2 max-pool (Simonyan & Zisserman's configurations A, B, D)
VGG_LAYERS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """conv3×3 → BatchNorm → ReLU blocks with max-pools (``VGG_LAYERS[name]``), then Linear(512, classes)."""

    def __init__(self, name: str = "vgg13", in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if name not in VGG_LAYERS:
            raise ValueError(f"Invalid VGG: {name!r}; expected one of {tuple(VGG_LAYERS)}")
        layers: list[nn.Module] = []
        n_in = in_channels
        for item in VGG_LAYERS[name]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(n_in, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)), nn.ReLU()]
                n_in = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(n_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _SkipLayer(nn.Module):
    """out = act(W·x_last + b) + Σ_j skips[j]·x_j over all earlier outputs x_0 … x_last."""

    def __init__(self, n_in: int, n_out: int, index: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.skips = nn.Parameter(torch.zeros(index + 1))  # all off at the start

    def forward(self, stack: torch.Tensor) -> torch.Tensor:  # stack: (batch, features, index + 1)
        out = F.relu(self.linear(stack[:, :, -1])) + (stack * self.skips).sum(2)
        return torch.cat((stack, out.unsqueeze(2)), 2)


class SkipAutoencoder(nn.Module):
    """The paper's denoising autoencoder with learnable skip connections (``depth`` layers of width n)."""

    def __init__(self, n: int = 784, depth: int = 6):
        super().__init__()
        self.n = n
        self.layers = nn.Sequential(*[_SkipLayer(n, n, i) for i in range(depth)])

    def forward(self, x):
        return self.layers(x.reshape(x.shape[0], -1, 1))[:, :, -1]


class _DenseLayer(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, F.relu(self.conv(x))], 1)


class DenseNet(nn.Module):
    """Stem conv(c→planes) → ``depth`` dense layers (growth ``planes``) → 1-channel transition → Linear.

    As in the paper's code the classifier reads only the transition's channel, and its logits pass a
    ReLU (kept for fidelity; cross-entropy still trains through the positive logits).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, depth: int = 5,
                 planes: int = 12):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        self.block = nn.Sequential(*[_DenseLayer(planes * (i + 1), planes) for i in range(depth)])
        self.transition = _DenseLayer(planes * (depth + 1), 1)
        self.fc = nn.Linear(image_size * image_size, num_classes)

    def forward(self, x):
        out = self.transition(self.block(self.conv1(x)))
        return F.relu(self.fc(out[:, -1].flatten(1)))


MODELS = ("mlp", "conv", "resnet18", *VGG_LAYERS, "skip-ae", "densenet")


def input_size(name: str) -> int | None:
    """The image size model ``name`` needs, which the data pipeline pads to (None: the data set's own)."""
    return 32 if name in VGG_LAYERS else None


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A model for inputs of ``input_shape`` (C, H, W) or (features,)."""
    import math

    if name == "mlp":
        return MLP((math.prod(input_shape), 200, 80, num_classes))
    if name == "skip-ae":
        return SkipAutoencoder(math.prod(input_shape))
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs images (C, H, W), got inputs of shape {list(input_shape)}; "
                         "use --model mlp for the digits")
    c, h, w = input_shape
    if name == "conv":
        if (h, w) != (28, 28):
            raise ValueError(f"--model conv needs 28x28 images, got {h}x{w}")
        return ConvNet(c, num_classes)
    if name == "resnet18":
        return ResNet18(c, num_classes)
    if name == "densenet":
        return DenseNet(c, h, num_classes)
    if name in VGG_LAYERS:
        if (h, w) != (32, 32) or num_classes < 1:
            raise ValueError(f"--model {name} classifies 32x32 images (five 2x2 pools down to 1x1), got {h}x{w} "
                             f"and {num_classes} classes; MNIST-sized data sets are padded to 32x32 when loaded "
                             "for it")
        return VGG(name, c, num_classes)
    raise ValueError(f"Invalid model: {name!r}; expected one of {MODELS}")
