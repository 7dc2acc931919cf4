"""The Triton backend's step: argument checks, then ONE launch per (param dtype, grad dtype) bucket
(``kernels.elementwise_kernel`` for none/L1/L1Pos, ``kernels.row_kernel`` for the group maps) over
every tensor of the bucket. Tables and their caches: tables.py. Contract: backends/contract.py.

Compact moments (backends/moments.py): bf16 ones run in the same kernels (MOMENTS constexpr, with
the step counts for the random bits in ``sr_steps``); 8-bit ones in
``moment_kernels.code_block_kernel``, which also writes θ for the element-wise maps and is
followed by ``kernels.row_kernel`` for the row maps (two launches then).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch
import triton.language as tl

from ...regularizers import Regularizer
from ..contract import Hyper, StepTensors, check_tensors, fused_code, state_dtype
from ..layout import kernel_views
from . import kernels, moment_kernels, tables
from .moment_math import FORMAT_CODES

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on the CPU)."""
    return kernels.INTERPRETING


def _addresses(tensors: list[torch.Tensor], idx: list[int]) -> list[int]:
    """data_ptr of tensors[i] for i in idx; zeros for a state list the kind does not use."""
    if not tensors:
        return [0] * len(idx)
    return [tensors[i].data_ptr() for i in idx]


# ---- the step ---------------------------------------------------------------------------------------
def _check_capturable(steps, lr, device: torch.device) -> None:
    for i, s in enumerate(steps):
        if s.device != device or s.numel() != 1:
            raise ValueError(f"steps[{i}] must be a one-element tensor on the params' device ({device}) with "
                             f"capturable=True, got {s.numel()} elements on {s.device}")
    if isinstance(lr, torch.Tensor) and (lr.device != device or lr.numel() != 1 or not lr.is_floating_point()):
        raise ValueError(f"lr must be a one-element floating tensor on the params' device ({device}) with "
                         f"capturable=True, got {lr.dtype} with {lr.numel()} elements on {lr.device}")


def _current_device(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' one (params on cuda:1
    while cuda:0 is current would otherwise run with foreign pointers, on another stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def step(tensors: StepTensors, hyper: Hyper, reg: Regularizer, *, grad_scale: torch.Tensor | None = None,
         found_inf: torch.Tensor | None = None, capturable: bool = False) -> torch.Tensor:
    """``reference.step`` with Triton kernels: update the params and their states in place, return
    the non-zeros of each new θ (int64, on the params' device).

    ``capturable``: counts and lr on the device, hyper table built there, no host read (see
    reference.py [note: capturable]); ``found_inf`` is then read by the kernels, which leave a
    skipped step's tensors unchanged and count them as they are."""
    params, grads, duals, exp_avgs, exp_avg_sqs, steps, m_scales, s_scales = map(list, tensors)
    code = fused_code(reg)
    if code is None:
        raise ValueError(f"backend 'triton' does not implement the {type(reg).__name__} regularizer "
                         f"(kind {reg.kind!r}); use backend='reference'")
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    check_tensors(tensors, hyper, tuple(_TL_DTYPES))
    device = params[0].device
    from . import unavailable_reason

    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")

    found_inf_dev = found_inf.to(device, non_blocking=True).reshape(()) if found_inf is not None else None
    grad_scale_dev = grad_scale.to(device, non_blocking=True).reshape(()) if grad_scale is not None else None
    if capturable:
        _check_capturable(steps, hyper.lr, device)
        step_counts = None
    else:
        hyper = dataclasses.replace(hyper, lr=float(hyper.lr))  # a hashable cache key
        step_counts = _step_counts(steps)

    row_kernel = code.is_row_map
    fmt = tensors.moments if hyper.uses_exp_avg else "fp32"  # contract.check_tensors' rule
    code_lens = [tables.code_row_len(p.shape) if fmt == "8bit" else 0 for p in params]
    group_sizes = [reg.group_size(p.shape) if row_kernel else 1 for p in params]
    used_states = [duals if hyper.uses_dual else [], exp_avgs if hyper.uses_exp_avg else [],
                   exp_avg_sqs if hyper.uses_exp_avg_sq else []]
    c_params, c_grads, (c_duals, c_ms, c_ss), writeback = kernel_views(params, grads, used_states, group_sizes)

    counts = torch.zeros(len(params), dtype=torch.int64, device=device)
    buckets: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, (p, g) in enumerate(zip(c_params, c_grads)):
        buckets[(p.dtype, g.dtype)].append(i)

    cfg = tables.launch_config(device)
    for (p_dtype, g_dtype), idx in buckets.items():
        sizes = tuple((c_params[i].numel(), group_sizes[i]) for i in idx)
        entries, num_entries = tables._entries_cache.get_or_build(
            (device, row_kernel, cfg, sizes), lambda: tables.build_entries(sizes, row_kernel, cfg, device),
            "entries_builds")
        if num_entries == 0:
            continue

        infos = tuple(zip(_addresses(c_params, idx), _addresses(c_grads, idx), _addresses(c_duals, idx),
                          _addresses(c_ms, idx), _addresses(c_ss, idx), *zip(*sizes), idx,
                          _addresses(m_scales, idx), _addresses(s_scales, idx), [code_lens[i] for i in idx]))
        table, aligned = tables._table_cache.get_or_build((device, p_dtype, g_dtype, cfg, infos),
                                                          lambda: tables.build_table(infos, cfg, device), "table_builds")
        tables.keep_if_captured(device, table, entries)
        shapes = [params[i].shape for i in idx]
        if capturable:
            hp = tables.device_hyper(hyper, reg, [steps[i] for i in idx], shapes, device)
        else:
            hp = tables.host_hyper(hyper, reg, [step_counts[i] for i in idx], shapes, device)
        args = (table, entries, hp, counts,
                grad_scale_dev if grad_scale_dev is not None else hp,
                found_inf_dev if found_inf_dev is not None else hp)
        meta = dict(KIND=int(hyper.kind), REG=int(code),
                    HAS_GRAD_SCALE=grad_scale_dev is not None, HAS_FOUND_INF=found_inf_dev is not None,
                    P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype])
        options = {} if interpreting() else {"enable_fp_fusion": False}
        if fmt == "8bit":
            # the states, block by block (and θ for the element-wise maps): moment_kernels.py
            code_sizes = tuple((c_params[i].numel(), code_lens[i]) for i in idx)
            code_entries, num_code_entries = tables._entries_cache.get_or_build(
                ("8bit", device, cfg, code_sizes), lambda: tables.build_code_entries(code_sizes, cfg, device),
                "entries_builds")
            tables.keep_if_captured(device, code_entries)
            tables.stats["launches"] += 1
            with _current_device(device):
                moment_kernels.code_block_kernel[(num_code_entries,)](
                    table, code_entries, *args[2:], **meta, WRITE_THETA=not row_kernel, NB=cfg.code_blocks,
                    num_warps=cfg.num_warps, **options)
            if not row_kernel:
                continue
        # bf16 moments: the step counts of their random bits (hp stands in for an unused pointer);
        # the bits are keyed by each value's top 16 bits, so copies made by kernel_views round alike.
        sr_steps = hp if fmt != "bf16" else tables.sr_steps(
            [steps[i] for i in idx], None if capturable else [step_counts[i] for i in idx], capturable, device)
        meta.update(MOMENTUM=hyper.momentum, S_DTYPE=_TL_DTYPES[state_dtype(p_dtype)], MOMENTS=FORMAT_CODES[fmt])
        tables.stats["launches"] += 1
        with _current_device(device):
            if row_kernel:
                kernels.row_kernel[(num_entries,)](*args, sr_steps, **meta, BLOCK=cfg.row_block,
                                                   NUM_CLASSES=cfg.num_row_classes,
                                                   num_warps=cfg.row_num_warps, **options)
            else:
                kernels.elementwise_kernel[(num_entries,)](*args, sr_steps, **meta, BLOCK=cfg.block, ALIGNED=aligned,
                                                           num_warps=cfg.num_warps, **options)

    for orig, copy in writeback:  # after a skipped step this copies unchanged values back
        orig.copy_(copy)
    return counts


def _step_counts(steps) -> list[float]:
    """Each tensor's step count (already incremented by contract.begin_step), read on the host."""
    try:
        return torch.stack(steps).reshape(-1).tolist()  # the optimizer's 0-dim CPU counters: one op
    except RuntimeError:  # mixed shapes or devices (functional callers)
        return [float(s) for s in steps]
