"""Memory layouts: states laid out like their param, and the tensors a fused kernel walks.

The kernels walk each tensor as flat memory. A param stored densely in another dim order
(channels_last conv weights, a transposed linear weight) is still one block of memory, walked in
its storage order. [note: dense views] When its grad and states have its strides (states are
created in the param's layout, and autograd lays grads out like their param), the kernels update
it as it is: element k of each tensor's memory is the same coordinate (the ops check this,
csrc/flat_layout.h). Otherwise the param's storage order is applied to all of them as a permutation:
the tensors that are contiguous under it become contiguous views of the same memory, the others
are copied (and, if the kernel writes them, copied back). The row maps also need each group to
be a block of consecutive memory; a layout that breaks one is copied to row-major order.
"""
from __future__ import annotations

import itertools
import math
import warnings

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
        # size-1 dims hold no memory: where they sort does not matter (as in csrc/flat_layout.h)
        shape = p.shape
        lead = {d for d in range(leading_dims(shape, group_size)) if shape[d] != 1}
        in_memory = [d for d in order if shape[d] != 1]
        if set(in_memory[:len(lead)]) != lead:  # the dims indexing groups must be the outermost ones
            return None
    return order


def _is_dense(shape, stride, order) -> bool:
    """No gaps and no overlap: walked in ``order`` (outermost first), the strides are the running
    products of the sizes (size-1 dims may have any stride). Cheaper than a permuted view."""
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and stride[d] != expected:
            return False
        expected *= shape[d]
    return True


def _view(t: torch.Tensor, order, writeback: list | None) -> torch.Tensor:
    v = t if order is None else t.permute(order)
    if v.is_contiguous():
        return v
    c = v.contiguous()
    if writeback is not None:
        writeback.append((v, c))
    return c


def kernel_views(params, grads, states, group_sizes):
    """Tensors the kernels can walk as flat memory: (params, grads, states, writeback).

    A param and its partners are handed over as they are when they are contiguous, or dense with
    identical strides (the fused ops accept that, csrc/flat_layout.h); else as contiguous permuted
    views of the same memory where a dense order allows it, else as copies. ``states`` is a list of
    state lists (each empty or one tensor per param); ``writeback`` holds the (original view, copy)
    pairs to copy back after the kernel ran, for the params and states that had to be copied.
    """
    if all(map(torch.Tensor.is_contiguous, itertools.chain(params, grads, *states))):  # no Python-level loop
        return params, grads, states, []
    n = len(params)
    if not (len(grads) == n and len(group_sizes) == n and all(len(lst) in (0, n) for lst in states)):
        return params, grads, states, []  # mismatched lists are the op's to report, as it gets them
    # [note: step overhead] a permuted view costs ~2 µs: only the tensors that need one are touched,
    # and the usual dense case (all of p's partners with p's strides) needs none
    todo = sorted({i for lst in (params, grads, *states) for i, ok in enumerate(map(torch.Tensor.is_contiguous, lst))
                   if not ok})
    out_p, out_g, out_s = list(params), list(grads), [list(lst) for lst in states]
    writeback: list = []
    for i in todo:
        p = params[i]
        partners = [grads[i]] + [lst[i] for lst in states if lst]
        order = None
        shape, stride = p.shape, p.stride()
        if not p.is_contiguous() and all(t.shape == shape for t in partners):
            # a partner of another shape stays unpermuted (and so does p): the op's check names it
            order = _kernel_order(p, group_sizes[i])
            if order is not None and all(t.stride() == stride for t in partners) and _is_dense(shape, stride, order):
                # the usual dense case: the kernels walk p and its partners as they are, in the same
                # flat order (csrc/flat_layout.h checks it again); no view per tensor and step
                continue
        # whether p is walked in place: no copy of it joined writeback (a data_ptr comparison would
        # say the same, but torch.compile(fullgraph=True) cannot trace one)
        before = len(writeback)
        out_p[i] = _view(p, order, writeback)
        param_in_place = len(writeback) == before
        out_g[i] = _view(grads[i], order, None)
        param_copied = len(writeback)
        for lst, out in zip(states, out_s):
            if lst:
                out[i] = _view(lst[i], order, writeback)
        if len(writeback) > param_copied and param_in_place:
            _warn_state_layout(i, p, [lst[i] for lst in states if lst])
    return out_p, out_g, out_s, writeback


_warned_state_layout = False


def _warn_state_layout(i: int, p: torch.Tensor, states: list[torch.Tensor]) -> None:
    """Once per process: a param walked in place whose states are stored in another order costs two
    copies of each such state per step, and the user can fix it (states are made in the param's
    layout only when they are created or loaded)."""
    global _warned_state_layout
    if _warned_state_layout:
        return
    _warned_state_layout = True
    warnings.warn(
        f"bregman_fused: the optimizer states of params[{i}] (shape {list(p.shape)}, strides {list(p.stride())}) "
        f"are laid out differently ({[list(s.stride()) for s in states]}), so they are copied in and out of "
        "every fused step; this happens when a param's memory format changed after its states were made "
        "(e.g. model.to(memory_format=torch.channels_last) after the first step). Reloading the optimizer "
        "state lays them out like their params: opt.load_state_dict(opt.state_dict())",
        RuntimeWarning, stacklevel=2)
