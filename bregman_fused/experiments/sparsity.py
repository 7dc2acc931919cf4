"""Sparsity of a model that may be sharded (FSDP2 DTensors) or replicated (DDP).

Same definitions as ``bregman_fused.metrics`` (density = fraction of non-zeros over Linear and Conv
weights; conv-kernel density; node density = fraction of neurons / output channels with any
non-zero incoming weight), but counted on each rank's local shard and summed over ranks when the
weights are DTensors: FSDP2 shards dim 0, so every row and every kernel lies whole on one rank.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed as dist_utils

__all__ = ["sparsity_stats"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def sparsity_stats(model: nn.Module) -> dict[str, float]:
    """{"density", "linear_density", "conv_kernel_density", "node_density"}; a collective under FSDP2.

    A ratio over no elements is NaN: a model without convs has no conv-kernel density (0.0 would
    read as "every kernel pruned")."""
    # [nnz, total] for: all weights, linear weights, conv kernels, nodes
    counts = [0.0] * 8
    sharded = False
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None or not isinstance(m, (nn.Linear, *_CONV)):
            continue
        sharded |= dist_utils.is_dtensor(w)
        t = dist_utils.local(w.detach())
        if t.numel() == 0:  # an empty shard (more ranks than rows) adds nothing
            continue
        nnz = float(torch.count_nonzero(t))
        counts[0] += nnz
        counts[1] += t.numel()
        if isinstance(m, nn.Linear):
            counts[2] += nnz
            counts[3] += t.numel()
        elif t.dim() > 2:
            kernels = t.reshape(t.shape[0] * t.shape[1], -1)
            counts[4] += float((kernels != 0).any(dim=1).sum())
            counts[5] += kernels.shape[0]
        counts[6] += float((t.reshape(t.shape[0], -1) != 0).any(dim=1).sum())
        counts[7] += t.shape[0]
    if sharded:
        counts = dist_utils.all_reduce_sum(counts)

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan  # nothing to count (no convs in an MLP): no value, not 0

    return dict(density=ratio(counts[0], counts[1]), linear_density=ratio(counts[2], counts[3]),
                conv_kernel_density=ratio(counts[4], counts[5]), node_density=ratio(counts[6], counts[7]))
