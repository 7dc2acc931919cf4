"""The paper's models, written from their descriptions.

``MLP``: fully connected, ReLU; the paper's 784-200-80-10 on MNIST, 64-200-80-10 on scikit-learn's
8×8 digits. ``ConvNet``: conv 64-64 5×5 + FC 1024-128-10 (the paper's Fashion-MNIST net).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "ConvNet"]


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
