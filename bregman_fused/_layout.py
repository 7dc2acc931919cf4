"""Memory layouts: states laid out like their param, and the contiguous views a fused kernel reads.

The kernels walk flat, contiguous memory. A param stored in another dense order (channels_last
conv weights, a transposed linear weight) is still one contiguous block: a permutation of its dims
makes it a contiguous view of the same memory. When its grad and states share that order (states
are created in the param's layout, and autograd lays grads out like their param) the kernel updates
it in place, with no copy in and out. [note: dense views] The same permutation is applied to the
param and all its partners, so element i of every view is the same coordinate; a partner that is
not contiguous under it is copied (and, if the kernel writes it, copied back).
"""
from __future__ import annotations

import itertools
import math

import torch

__all__ = ["leading_dims", "in_layout_of", "kernel_views"]


def leading_dims(shape, group_size: int) -> int:
    """The smallest k with prod(shape[k:]) == group_size: dims before k index whole groups."""
    shape = tuple(shape)
    for k in range(len(shape) + 1):
        if math.prod(shape[k:]) == group_size:
            return k
    return 0


def in_layout_of(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` (same shape as ``like``) with ``like``'s strides when ``like`` is dense
    (e.g. channels_last), else contiguous: the layout that lets the kernels skip copies."""
    return torch.empty_like(like, dtype=value.dtype, device=value.device).copy_(value)


def _kernel_order(p: torch.Tensor, group_size: int) -> tuple[int, ...] | None:
    """The permutation of p's dims from outermost to innermost in memory, or None when it is the
    identity or would break the row maps: the dims that span a group must stay innermost, so
    that each group is one block of ``group_size`` consecutive elements."""
    order = tuple(sorted(range(p.dim()), key=p.stride().__getitem__, reverse=True))  # stable: ties keep dim order
    if order == tuple(range(p.dim())):
        return None
    if group_size > 1:
        lead = leading_dims(p.shape, group_size)
        if set(order[lead:]) != set(range(lead, p.dim())):
            return None
    return order


def _view(t: torch.Tensor, order, writeback: list | None) -> torch.Tensor:
    v = t if order is None else t.permute(order)
    if v.is_contiguous():
        return v
    c = v.contiguous()
    if writeback is not None:
        writeback.append((v, c))
    return c


def kernel_views(params, grads, states, group_sizes):
    """Contiguous tensors for the kernels: (params, grads, states, writeback).

    ``states`` is a list of state lists (each empty or one tensor per param); ``writeback`` holds
    the (original view, copy) pairs to copy back after the kernel ran, for the params and states
    that had to be copied. The common all-contiguous case returns the inputs themselves.
    """
    if all(map(torch.Tensor.is_contiguous, itertools.chain(params, grads, *states))):  # no Python-level loop
        return params, grads, states, []
    n = len(params)
    if not (len(grads) == n and len(group_sizes) == n and all(len(lst) in (0, n) for lst in states)):
        return params, grads, states, []  # mismatched lists are the op's to report, as it gets them
    # [note: step overhead] a permuted view costs ~2 µs: only the tensors that need one are touched
    todo = sorted({i for lst in (params, grads, *states) for i, ok in enumerate(map(torch.Tensor.is_contiguous, lst))
                   if not ok})
    out_p, out_g, out_s = list(params), list(grads), [list(lst) for lst in states]
    writeback: list = []
    for i in todo:
        p = params[i]
        partners = [grads[i]] + [lst[i] for lst in states if lst]
        order = None
        if not p.is_contiguous() and all(t.shape == p.shape for t in partners):
            # a partner of another shape stays unpermuted (and so does p): the op's check names it
            order = _kernel_order(p, group_sizes[i])
        out_p[i] = _view(p, order, writeback)
        out_g[i] = _view(grads[i], order, None)
        for lst, out in zip(states, out_s):
            if lst:
                out[i] = _view(lst[i], order, writeback)
    return out_p, out_g, out_s, writeback
