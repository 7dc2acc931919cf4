"""Sparsity metrics of a model. "Density" = fraction of non-zeros; "sparsity" = 1 − density.

All functions look at the weights of ``nn.Linear`` and ``nn.Conv{1,2,3}d`` layers (biases and
normalisation parameters are not what sparse training removes) unless said otherwise.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = [
    "tensor_density",
    "density",
    "linear_density",
    "conv_kernel_density",
    "node_density",
    "node_densities",
    "layer_densities",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHT_TYPES = (nn.Linear, *_CONV_TYPES)


def _weights(model: nn.Module, types: tuple[type, ...], unique: bool = True) -> Iterable[tuple[str, torch.Tensor]]:
    """(layer name, weight) of the layers of ``types``. ``unique``: a weight shared by several layers
    (tied) once, under its first layer, as ``opt.density()`` counts it (the totals); else under every
    layer (the per-layer tables)."""
    seen: set[int] = set()
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, types) and w is not None and not (unique and id(w) in seen):
            seen.add(id(w))
            yield name, w


def _ratio(nnz: int, total: int) -> float:
    # an empty selection has no non-zeros; 0/0 is reported as 0, not NaN
    return nnz / total if total else 0.0


@torch.no_grad()
def tensor_density(tensors: torch.Tensor | Iterable[torch.Tensor]) -> float:
    """Fraction of non-zero entries over one tensor or over several together."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    nnz = total = 0
    for t in tensors:
        nnz += int(torch.count_nonzero(t))
        total += t.numel()
    return _ratio(nnz, total)


def density(model: nn.Module) -> float:
    """Fraction of non-zero weights over all Linear and Conv weights together."""
    return tensor_density(w for _, w in _weights(model, _WEIGHT_TYPES))


def linear_density(model: nn.Module) -> float:
    """Fraction of non-zero entries of the Linear weights."""
    return tensor_density(w for _, w in _weights(model, (nn.Linear,)))


@torch.no_grad()
def conv_kernel_density(model: nn.Module) -> float:
    """Fraction of conv kernels (the kh×kw slices of an (out, in, kh, kw) weight) with any non-zero."""
    nnz = total = 0
    for _, w in _weights(model, _CONV_TYPES):
        kernels = w.reshape(w.shape[0] * w.shape[1], -1)
        nnz += int((kernels != 0).any(dim=1).sum())
        total += kernels.shape[0]
    return _ratio(nnz, total)


@torch.no_grad()
def node_densities(model: nn.Module) -> dict[str, float]:
    """Per layer: fraction of its neurons / output channels with any non-zero incoming weight."""
    out = {}
    for name, w in _weights(model, _WEIGHT_TYPES, unique=False):
        out[name] = _ratio(int((w.reshape(w.shape[0], -1) != 0).any(dim=1).sum()), w.shape[0])
    return out


@torch.no_grad()
def node_density(model: nn.Module) -> float:
    """Fraction of all neurons / output channels (of Linear and Conv layers) with any non-zero
    incoming weight."""
    nnz = total = 0
    for _, w in _weights(model, _WEIGHT_TYPES):
        nnz += int((w.reshape(w.shape[0], -1) != 0).any(dim=1).sum())
        total += w.shape[0]
    return _ratio(nnz, total)


def layer_densities(model: nn.Module) -> dict[str, float]:
    """{layer name: density of its weight} for every Linear and Conv layer."""
    return {name: tensor_density(w) for name, w in _weights(model, _WEIGHT_TYPES, unique=False)}
