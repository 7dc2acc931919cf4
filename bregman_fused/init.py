"""Sparse initialisation: start Bregman training from a very sparse θ.

Bregman iterations only *add* weights (a coordinate becomes non-zero when its dual crosses the
threshold), so the initial θ should be sparse: a fraction ``density`` of the weights non-zero.
Three ways to choose which weights survive:

``"elementwise"``  every entry independently with probability ``density`` (Bernoulli): the paper's
                   choice for linear layers.
``"row"``          whole rows of ``weight.flatten(1)`` (all incoming weights of one neuron / output
                   channel); exactly ``ceil(density·rows)`` rows, drawn without repetition.
``"kernel"``       whole kh×kw kernels of a conv weight; exactly ``ceil(density·out·in)`` kernels,
                   drawn without repetition (``randperm``). [note: exact group counts]

Scale. The dense Kaiming-normal init has E[(Wx)²] = gain²·E[x²] per output. Keeping only a fraction
r of the weights divides that by r, so the surviving weights are multiplied by 1/√r (r = the mask's
expected density: ``density`` for Bernoulli masks, k/n for exact group counts) and the forward
variance of the dense init is kept. ``scale=`` overrides this with an explicit factor on the
Kaiming std, as the paper's code does (its MLP used 0.7/√0.01 = 7 at density 0.01, i.e. 0.7 of the
variance-preserving value; its ConvNet used 10).

Biases: the paper draws them from U(−b₀/√fan_in, b₁/√fan_in) with b₀ = 0, i.e. non-negative. With a
1 %-dense weight most neurons receive no input at all; a positive bias keeps their ReLU open so
gradients reach their (zero) incoming weights' duals and the network can grow.

[note: exact group counts] The research code drew group indices with ``randint`` and so could pick
the same kernel twice, giving fewer non-zero kernels than asked; with few groups a Bernoulli mask
also often leaves a layer with no group at all (10 rows at 1 %: P(all zero) ≈ 0.9). Group masks here
use ``randperm`` and ``ceil`` (at least one group whenever density > 0).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

__all__ = [
    "MODES",
    "exact_count",
    "sparse_mask",
    "kaiming_std",
    "sparse_weight_",
    "sparse_bias_uniform_",
    "sparsify_",
]

MODES = ("elementwise", "row", "kernel")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_density(density: float) -> float:
    density = float(density)
    if not (math.isfinite(density) and 0.0 <= density <= 1.0):
        raise ValueError(f"Invalid density: {density} (must be in [0, 1]; density = fraction of non-zeros)")
    return density


def exact_count(n: int, density: float) -> int:
    """Number of groups kept out of ``n``: ceil(density·n), clipped to [0, n].

    The product is rounded to 9 decimals first so 0.07·100 = 7.000000000000001 gives 7, not 8.
    """
    density = _check_density(density)
    return min(n, math.ceil(round(n * density, 9)))


def _group_shape(shape: torch.Size, mode: str) -> tuple[int, int]:
    """(number of groups, group length) of a weight for ``mode``."""
    if mode == "elementwise":
        return math.prod(shape), 1
    if len(shape) < 2:
        raise ValueError(f"mode={mode!r} needs a weight with at least 2 dims, got shape {list(shape)}")
    if mode == "row":
        return shape[0], math.prod(shape[1:])
    if mode == "kernel":
        if len(shape) < 3:
            raise ValueError(f"mode='kernel' needs a conv weight (out, in, *kernel), got shape {list(shape)}")
        return shape[0] * shape[1], math.prod(shape[2:])
    raise ValueError(f"Invalid mode: {mode!r}; expected one of {MODES}")


def sparse_mask(shape, density: float, mode: str = "elementwise", *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask of ``shape`` keeping a fraction ``density`` of the entries (see the module doc).

    ``"elementwise"``: Bernoulli(density) per entry; ``"row"`` / ``"kernel"``: exactly
    ``exact_count(groups, density)`` whole groups, drawn without repetition.
    """
    density = _check_density(density)
    shape = torch.Size(shape)
    groups, length = _group_shape(shape, mode)
    if generator is not None:
        device = generator.device  # draw where the generator lives, then move
    if mode == "elementwise":
        keep = torch.rand(groups, generator=generator, device=device) < density
    else:
        keep = torch.zeros(groups, dtype=torch.bool, device=device)
        keep[torch.randperm(groups, generator=generator, device=device)[: exact_count(groups, density)]] = True
    return keep.reshape(groups, 1).expand(groups, length).reshape(shape)


def _mask_density(shape, density: float, mode: str) -> float:
    """Expected fraction of entries the mask keeps (what the variance-preserving scale divides by)."""
    if mode == "elementwise":
        return density
    groups, _ = _group_shape(torch.Size(shape), mode)
    return exact_count(groups, density) / groups if groups else 0.0


def kaiming_std(weight: torch.Tensor, nonlinearity: str = "relu") -> float:
    """std of ``nn.init.kaiming_normal_(weight, mode='fan_in', nonlinearity=...)``: gain/√fan_in."""
    fan_in = nn.init._calculate_correct_fan(weight, "fan_in")
    return nn.init.calculate_gain(nonlinearity) / math.sqrt(fan_in)


@torch.no_grad()
def sparse_weight_(weight: torch.Tensor, density: float, mode: str = "elementwise", *, scale: float | None = None,
                   reinit: bool = True, nonlinearity: str = "relu",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Sparsify one weight in place; returns the boolean mask.

    reinit=True: draw N(0, (scale·kaiming_std)²) first. ``scale=None`` means 1/√r with r the mask's
    expected density, which keeps the dense init's forward variance E[(Wx)²]. reinit=False keeps
    the current values, masks them and multiplies the survivors by ``scale`` (default 1/√r as well).
    """
    density = _check_density(density)
    mask = sparse_mask(weight.shape, density, mode, generator=generator, device=weight.device)
    r = _mask_density(weight.shape, density, mode)
    factor = (1.0 / math.sqrt(r) if r > 0 else 0.0) if scale is None else float(scale)
    if reinit:
        std = kaiming_std(weight, nonlinearity)
        noise = torch.randn(weight.shape, generator=generator, device=mask.device, dtype=torch.float32)
        weight.copy_(noise.to(weight.device) * (std * factor))
    else:
        weight.mul_(factor)
    weight.mul_(mask.to(weight.device))
    return mask


@torch.no_grad()
def sparse_bias_uniform_(bias: torch.Tensor, fan_in: int, low: float = 0.0, high: float = 1.0, *,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's bias init: U(−low/√fan_in, high/√fan_in), in place (low = 0: non-negative biases)."""
    if fan_in <= 0:
        raise ValueError(f"Invalid fan_in: {fan_in} (must be > 0)")
    lo, hi = -float(low) / math.sqrt(fan_in), float(high) / math.sqrt(fan_in)
    if hi < lo:
        raise ValueError(f"Invalid bias range: U({lo}, {hi}) is empty")
    u = torch.rand(bias.shape, generator=generator, device=generator.device if generator else bias.device)
    bias.copy_((lo + (hi - lo) * u).to(bias.device))
    return bias


def _layers(model: nn.Module, types: tuple[type, ...]) -> Iterable[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, types) and getattr(m, "weight", None) is not None:
            yield name, m


@torch.no_grad()
def sparsify_(model: nn.Module, density: float, *, linear: str | None = "elementwise",
              conv: str | None = "kernel", scale: float | None = None, reinit: bool = True,
              bias: tuple[float, float] | None = (0.0, 1.0), nonlinearity: str = "relu",
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Sparse initialisation of every Linear and Conv layer of ``model``, in place.

    Args:
        density: fraction of weights (or groups) kept non-zero, e.g. 0.01.
        linear: how to sparsify ``nn.Linear`` weights: ``"elementwise"`` (Bernoulli, the paper's),
            ``"row"`` (whole neurons) or None (leave them alone: neither re-drawn nor masked).
        conv: how to sparsify ``nn.Conv{1,2,3}d`` weights: ``"kernel"`` (whole kernels, exact count),
            ``"elementwise"``, ``"row"`` (whole output channels) or None.
        scale: factor on the Kaiming std of the surviving weights; None = 1/√(mask density), which
            keeps the forward variance of the dense Kaiming init. The paper: 0.7/√0.01 (MLP), 10 (ConvNet).
        reinit: draw fresh Kaiming-normal weights (True) or mask and rescale the current ones.
        bias: (b₀, b₁): biases of the sparsified layers ~ U(−b₀/√fan_in, b₁/√fan_in); None leaves them.
        generator: a ``torch.Generator`` for reproducible masks and values.

    Returns:
        {layer name: boolean mask of its weight}. A weight shared by several layers (tied) is
        sparsified once; its mask is listed under each of them.
    """
    density = _check_density(density)
    for mode in (linear, conv):
        if mode is not None and mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r}; expected one of {MODES} or None")
    masks: dict[str, torch.Tensor] = {}
    first_user: dict[int, str] = {}  # a weight shared by several layers (tied) is sparsified once
    done_biases: set[int] = set()
    for name, m in _layers(model, (nn.Linear, *_CONV_TYPES)):
        mode = linear if isinstance(m, nn.Linear) else conv
        if mode is None:
            continue
        if id(m.weight) in first_user:
            masks[name] = masks[first_user[id(m.weight)]]
        else:
            first_user[id(m.weight)] = name
            masks[name] = sparse_weight_(m.weight, density, mode, scale=scale, reinit=reinit,
                                         nonlinearity=nonlinearity, generator=generator)
        if bias is not None and getattr(m, "bias", None) is not None and id(m.bias) not in done_biases:
            done_biases.add(id(m.bias))
            fan_in = nn.init._calculate_correct_fan(m.weight, "fan_in")
            sparse_bias_uniform_(m.bias, fan_in, bias[0], bias[1], generator=generator)
    return masks
