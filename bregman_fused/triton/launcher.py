"""Host side of the Triton backend: the (tensor, chunk) tables, their caches, and the launch.

``step`` has exactly the signature and the return of ``reference.step``. Per (param dtype, grad
dtype) bucket it launches ONE kernel (``kernels.elementwise_kernel`` for none/L1/L1Pos,
``kernels.row_kernel`` for the group maps) over every tensor of the bucket.

Tables [note: table caches]. The kernels reach the tensors through two int64 device tensors:
``table`` (one row per tensor: base addresses, numel, row length, ...) and ``entries`` (one row per
program: tensor, first and end element or row). ``entries`` depends only on the tensors' sizes
and is cached by them; ``table`` depends on the data pointers and is cached by (device, dtypes,
data_ptrs, sizes): the same tensors reuse the uploaded table, a re-allocated tensor (new
data_ptr) or a different tensor list builds a new one, so a stale pointer is never used. A table
never keeps a tensor alive; equal addresses with equal sizes mean an equal table. The per-step
values (lr, bias corrections, thresholds) live in a separate small float64 table, cached per
setting with AdaBreg's bias corrections filled in per step — changing lr never recompiles.

Launch configuration [note: launch rule]. GPU, element-wise kernel: BLOCK = 2048 elements with
8 warps (8 fp32 per thread = two 128-bit accesses per tensor), and a chunk per program of
BLOCK·k elements, k chosen so that there are about 8 programs per SM, capped at 32 blocks
(65536 elements) per program; e.g. 100 M elements → ~1500 programs of 64 Ki elements. GPU, row
kernel: tiles of 4096 elements (R rows × C columns, C a power of 4 ≥ n), 8 warps, about
``chunk`` elements per program. Under the interpreter (CPU, tests) the blocks are 1024 elements
and chunks as large as possible: the interpreter pays per program and per op, not per element.
"""
from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import triton.language as tl

from .._layout import kernel_views
from ..regularizers import Regularizer
from . import kernels

KINDS = {"linbreg": 0, "adabreg": 1, "proxsgd": 2}
REGS = {"none": 0, "l1": 1, "l1pos": 2, "group": 3, "sparse_group": 4}
ROW_REGS = ("group", "sparse_group")

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}

# counters for tests and debugging: kernel launches and table (re)builds
stats: collections.Counter = collections.Counter()


# Triton decides at decoration time (import of kernels.py) whether @triton.jit functions are
# compiled or interpreted; TRITON_INTERPRET set later changes nothing.
_INTERPRETING = type(kernels.elementwise_kernel).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on the CPU)."""
    return _INTERPRETING


@dataclass(frozen=True)
class LaunchConfig:
    block: int  # element-wise kernel: elements per block
    num_warps: int
    row_block: int  # row kernel: elements per [R, C] tile, a power of 4
    row_num_warps: int
    max_chunk: int  # most elements (or row-tile elements) per program
    programs_per_sm: int

    @property
    def num_row_classes(self) -> int:
        return int(round(math.log(self.row_block, 4))) + 1


GPU_CONFIG = LaunchConfig(block=2048, num_warps=8, row_block=4096, row_num_warps=8, max_chunk=65536,
                          programs_per_sm=8)
INTERPRETER_CONFIG = LaunchConfig(block=1024, num_warps=1, row_block=1024, row_num_warps=1, max_chunk=1 << 22,
                                  programs_per_sm=1)


def launch_config(device: torch.device) -> LaunchConfig:
    return INTERPRETER_CONFIG if interpreting() else GPU_CONFIG


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk(total: int, granule: int, cfg: LaunchConfig, device: torch.device) -> int:
    """Elements per program: enough programs to fill the device, at most cfg.max_chunk. [note: launch rule]"""
    if interpreting():
        return max(granule, cfg.max_chunk // granule * granule)
    want = -(-total // (_sm_count(device) * cfg.programs_per_sm))
    chunk = -(-want // granule) * granule
    return max(granule, min(chunk, max(granule, cfg.max_chunk // granule * granule)))


# ---- caches [note: table caches] --------------------------------------------------------------
class _LRU(collections.OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or_build(self, key, build, stat: str):
        try:
            self.move_to_end(key)
            return self[key]
        except KeyError:
            pass
        stats[stat] += 1
        value = build()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


_entries_cache = _LRU(64)
_table_cache = _LRU(64)
_hyper_base_cache = _LRU(64)
_host_hyper_cache = _LRU(64)


def clear_caches() -> None:
    _entries_cache.clear()
    _table_cache.clear()
    _hyper_base_cache.clear()
    _host_hyper_cache.clear()


def _row_class(n: int, cfg: LaunchConfig) -> int:
    """Smallest k with 4^k ≥ n, or num_row_classes for rows longer than the tile."""
    k = 0
    while (1 << (2 * k)) < n:
        k += 1
    return k if k < cfg.num_row_classes else cfg.num_row_classes


def _build_entries(sizes, row_kernel: bool, cfg: LaunchConfig, device: torch.device):
    """(tensor, start, end) per program: element ranges, or row ranges for the row kernel."""
    _refuse_upload_under_capture(device, "work list")
    total = sum(numel for numel, _ in sizes)
    rows = []
    if not row_kernel:
        chunk = _chunk(total, cfg.block, cfg, device)
        for t, (numel, _) in enumerate(sizes):
            for start in range(0, numel, chunk):
                rows.append((t, start, min(start + chunk, numel)))
    else:
        chunk = _chunk(total, cfg.row_block, cfg, device)
        for t, (numel, n) in enumerate(sizes):
            if numel == 0:
                continue
            num_rows = numel // n
            k = _row_class(n, cfg)
            if k < cfg.num_row_classes:
                tile_rows = cfg.row_block >> (2 * k)
                per_entry = tile_rows * max(1, chunk // cfg.row_block)
            else:
                per_entry = max(1, chunk // n)
            for r in range(0, num_rows, per_entry):
                rows.append((t, r, min(r + per_entry, num_rows)))
    if not rows:
        return None, 0
    return torch.tensor(rows, dtype=torch.int64).to(device), len(rows)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _refuse_upload_under_capture(device: torch.device, what: str) -> None:
    """Uploading a table is a host→device copy, which a CUDA graph cannot record safely (a replay
    would read a host buffer that may be gone): refuse instead of replaying garbage."""
    if _capturing(device):
        raise RuntimeError(
            f"backend 'triton' cannot build its {what} while a CUDA graph is captured: the params, grads or "
            "states moved or changed shape since the last eager step (e.g. grads set to None before capture, "
            "or params that are not dense in memory or whose grads or states have another layout: those are "
            "copied every step). Keep the grads in place (zero_grad(set_to_none=False)) through warm-up and "
            "capture, or use backend 'cuda', which packs the pointers into the launch itself")


# Device tables a captured CUDA graph reads. The caches may evict (and free) them at any later
# step, while the graph still points at their memory: a graph's tables are kept alive for good.
_kept_for_graphs: list[torch.Tensor] = []


def _keep_if_captured(device: torch.device, *tensors: torch.Tensor) -> None:
    if _capturing(device):
        _kept_for_graphs.extend(tensors)


def _build_table(infos, cfg: LaunchConfig, device: torch.device):
    """The uploaded pointer table, and whether every address in it is 16-byte aligned (the
    element-wise kernel's vector path): both functions of the addresses, cached together."""
    _refuse_upload_under_capture(device, "pointer table")
    rows = [(p, g, v, m, s, numel, n, slot, _row_class(n, cfg)) for p, g, v, m, s, numel, n, slot in infos]
    table = torch.tensor(rows, dtype=torch.int64)
    assert table.shape[1] == kernels.TABLE_COLS
    aligned = all(a % 16 == 0 for info in infos for a in info[:5])
    return table.to(device), aligned


# ---- per-step hyper-parameters [note: hyper table] ---------------------------------------------
def _bias_corrections(kind: str, t: float, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """AdaBreg's step size τ/(1−β1^t) and √(1−β2^t) at step count t, in double as reference.py
    computes them; (0, 1) for the kinds without bias corrections."""
    if kind != "adabreg":
        return 0.0, 1.0
    return lr / (1.0 - beta1**t), math.sqrt(1.0 - beta2**t)


def _hyper_rows(kind: str, *, lr, beta1, beta2, eps, delta, reg: Regularizer, shapes):
    """One float64 row per tensor, computed in double exactly as reference.py does; the two
    step-count columns at t = 1 (the callers fill in the real counts)."""
    lamda_l1, _ = reg.lamdas()
    prox_sgd = kind == "proxsgd"
    t_scale = lr if prox_sgd else 1.0
    step_size, bc2_sqrt = _bias_corrections(kind, 1.0, lr, beta1, beta2)
    rows = []
    cache = {}
    for shape in shapes:
        key = tuple(shape)
        row = cache.get(key)
        if row is None:
            thr_row = t_scale * reg.thresholds(shape)[1] if reg.kind in ROW_REGS else 0.0
            row = [lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, (1.0 - beta1) * lr, step_size, bc2_sqrt,
                   1.0 if prox_sgd else delta, t_scale * lamda_l1, thr_row]
            cache[key] = row
        rows.append(row)
    return rows


# Columns that hold lr or a multiple of it, and the two that depend on the step count t.
_LR_COLS = (0, 6)  # lr, (1 − β1)·lr
_PROX_SGD_LR_COLS = (10, 11)  # the thresholds τ·λ₁, τ·λ₂·√n
_STEP_SIZE_COL, _BC2_SQRT_COL = 7, 8


def _device_hyper(kind: str, steps, lr, *, beta1, beta2, eps, delta, reg: Regularizer, shapes, device):
    """The hyper table of ``_hyper_rows`` built on the device from device step counts and a device lr,
    with tensor ops only (no host read, nothing uploaded while a CUDA graph is captured).
    [note: capturable] The lr-free part is ``_hyper_rows`` with lr = 1, built once per setting and
    cached; the lr columns are products with lr and the bias corrections are formed in float64 on
    the device, as the host does them in double."""
    key = ("hyper", device, kind, beta1, beta2, eps, delta, repr(reg.to_dict()), tuple(map(tuple, shapes)))
    base, lr_mask = _hyper_base_cache.get_or_build(key, lambda: _hyper_base(kind, beta1, beta2, eps, delta, reg,
                                                                             shapes, device), "hyper_builds")
    lr_t = lr.to(torch.float64) if isinstance(lr, torch.Tensor) else torch.full((), float(lr), dtype=torch.float64,
                                                                                  device=device)
    _keep_if_captured(device, base, lr_mask)
    hp = base * torch.where(lr_mask, lr_t.reshape(()), 1.0)
    if kind == "adabreg":
        t = torch.stack([s.reshape(()) for s in steps]).to(torch.float64)
        hp[:, _STEP_SIZE_COL] = lr_t / (1.0 - torch.pow(beta1, t))
        hp[:, _BC2_SQRT_COL] = torch.sqrt(1.0 - torch.pow(beta2, t))
    return hp


def _hyper_base(kind, beta1, beta2, eps, delta, reg, shapes, device):
    _refuse_upload_under_capture(device, "hyper-parameter table (β, ε, δ or λ changed)")
    rows = _hyper_rows(kind, lr=1.0, beta1=beta1, beta2=beta2, eps=eps, delta=delta, reg=reg,
                       shapes=shapes)
    cols = _LR_COLS + (_PROX_SGD_LR_COLS if kind == "proxsgd" else ())
    mask = torch.zeros(len(rows[0]), dtype=torch.bool)
    mask[list(cols)] = True
    return torch.tensor(rows, dtype=torch.float64).to(device), mask.to(device)


def _host_hyper(kind: str, step_counts, *, lr, beta1, beta2, eps, delta, reg: Regularizer, shapes, device):
    """The hyper table of ``_hyper_rows`` on the device, from host step counts and a host lr.
    Only AdaBreg's two bias-correction columns change with the step count: the rest is built once
    per setting and cached (on the device for the other kinds, which then upload nothing per
    step); AdaBreg's columns are computed in double per distinct count (``_bias_corrections``)."""
    _refuse_upload_under_capture(device, "hyper-parameter table from host values (capturable=False)")
    key = ("host", device, kind, lr, beta1, beta2, eps, delta, repr(reg.to_dict()), tuple(shapes))
    if kind != "adabreg":
        return _host_hyper_cache.get_or_build(
            key, lambda: _upload(_hyper_rows(kind, lr=lr, beta1=beta1, beta2=beta2, eps=eps, delta=delta, reg=reg,
                                             shapes=shapes), torch.float64, device),
            "hyper_builds")
    base = _host_hyper_cache.get_or_build(
        key, lambda: torch.tensor(_hyper_rows(kind, lr=lr, beta1=beta1, beta2=beta2, eps=eps, delta=delta, reg=reg,
                                              shapes=shapes), dtype=torch.float64),
        "hyper_builds")
    per_count = {t: _bias_corrections(kind, t, lr, beta1, beta2) for t in set(step_counts)}
    rows = base.pin_memory() if device.type == "cuda" else base.clone()  # a fresh buffer per step
    rows[:, _STEP_SIZE_COL:_BC2_SQRT_COL + 1] = torch.tensor([per_count[t] for t in step_counts], dtype=torch.float64)
    return rows.to(device, non_blocking=True) if device.type == "cuda" else rows


def _next_step_counts(steps) -> list[float]:
    """Each tensor's step count after this step, as reference.py's float32 ``steps[i] += 1``."""
    try:
        counts = torch.stack(steps)  # the optimizer's 0-dim float32 CPU counters: one op, not one per tensor
    except RuntimeError:  # mixed shapes or devices (functional callers)
        return [float(np.float32(float(s) + 1.0)) for s in steps]
    return (counts.to(torch.float32) + 1.0).reshape(-1).tolist()


def _check_capturable(steps, lr, device: torch.device) -> None:
    for i, s in enumerate(steps):
        if s.device != device or s.numel() != 1:
            raise ValueError(f"steps[{i}] must be a one-element tensor on the params' device ({device}) with "
                             f"capturable=True, got {s.numel()} elements on {s.device}")
    if isinstance(lr, torch.Tensor) and (lr.device != device or lr.numel() != 1 or not lr.is_floating_point()):
        raise ValueError(f"lr must be a one-element floating tensor on the params' device ({device}) with "
                         f"capturable=True, got {lr.dtype} with {lr.numel()} elements on {lr.device}")


def _upload(rows, dtype, device: torch.device) -> torch.Tensor:
    _refuse_upload_under_capture(device, "hyper-parameter table from host values (capturable=False)")
    host = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


# ---- argument checks -----------------------------------------------------------------------------
def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _check(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, uses_dual, uses_m, uses_s):
    # runs every step on every tensor (a wrong pointer would write foreign memory): one pass, with
    # the per-tensor work kept to attribute reads and comparisons
    if kind not in KINDS:
        raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {tuple(KINDS)}")
    n = len(params)
    states = [(name, lst) for name, lst, used in (("duals", duals, uses_dual), ("exp_avgs", exp_avgs, uses_m),
                                                   ("exp_avg_sqs", exp_avg_sqs, uses_s)) if used]
    for name, lst in [("grads", grads), ("steps", steps)] + states:
        if len(lst) != n:
            raise ValueError(f"{name}: expected {n} tensors (one per param), got {len(lst)}")
    device = params[0].device
    for i, (p, g) in enumerate(zip(params, grads)):
        dtype, shape = p.dtype, p.shape
        if dtype not in _TL_DTYPES:
            raise TypeError(f"params[{i}]: backend 'triton' supports float32/float64/bfloat16/float16, got {dtype}")
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device}, params[0] on {device}: one device per call")
        if g.shape != shape or g.dtype not in _TL_DTYPES or g.device != device:
            raise ValueError(f"grads[{i}]: expected a floating tensor of shape {list(shape)} on {device}, "
                             f"got {g.dtype} {list(g.shape)} on {g.device}")
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name, lst in states:
            st = lst[i]
            if st.shape != shape or st.dtype != state_dtype or st.device != device:
                raise ValueError(f"{name}[{i}]: expected {state_dtype} of shape {list(shape)} on {device}, "
                                 f"got {st.dtype} {list(st.shape)} on {st.device}")


def _addresses(tensors: list[torch.Tensor], idx: list[int]) -> list[int]:
    """data_ptr of tensors[i] for i in idx; zeros for a state list the kind does not use."""
    if not tensors:
        return [0] * len(idx)
    return [tensors[i].data_ptr() for i in idx]


# ---- the step ---------------------------------------------------------------------------------------
def _current_device(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' one (params on cuda:1
    while cuda:0 is current would otherwise run with foreign pointers, on another stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def step(
    kind: str,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    duals: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    delta: float,
    reg: Regularizer,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    capturable: bool = False,
) -> torch.Tensor | None:
    """``reference.step`` with Triton kernels: update ``params`` and their states in place, return
    the non-zeros of each new θ (int64, on the params' device), or None when ``found_inf`` is set.

    ``capturable``: steps and lr on the device, hyper table built there, no host read (see
    reference.py [note: capturable]); the counts are returned even after a skipped step."""
    params, grads, duals, exp_avgs, exp_avg_sqs, steps = (
        list(params), list(grads), list(duals), list(exp_avgs), list(exp_avg_sqs), list(steps))
    if reg.kind not in REGS:
        raise ValueError(f"backend 'triton' does not implement the {type(reg).__name__} regularizer "
                         f"(kind {reg.kind!r}); use backend='reference'")
    uses_dual = kind != "proxsgd"
    uses_m = kind == "adabreg" or (kind == "linbreg" and beta1 > 0)
    uses_s = kind == "adabreg"
    if not params:
        if kind not in KINDS:
            raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {tuple(KINDS)}")
        return torch.zeros(0, dtype=torch.int64)
    _check(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, uses_dual, uses_m, uses_s)
    device = params[0].device
    from . import unavailable_reason

    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")

    # found_inf is read by the kernel (no host sync before the launch); the host reads it only after
    # the launch, for the CPU step counters and the return value
    found_inf_dev = found_inf.to(device, non_blocking=True).reshape(()) if found_inf is not None else None
    grad_scale_dev = None
    if grad_scale is not None:
        grad_scale_dev = grad_scale.to(device, non_blocking=True).reshape(())

    if capturable:
        _check_capturable(steps, lr, device)
        torch._foreach_add_(steps, 1.0)  # the bias corrections read the incremented counts
        step_counts = None
    else:
        lr = float(lr)
        step_counts = _next_step_counts(steps)

    row_kernel = reg.kind in ROW_REGS
    group_sizes = [reg.group_size(p.shape) if row_kernel else 1 for p in params]
    used_states = [duals if uses_dual else [], exp_avgs if uses_m else [], exp_avg_sqs if uses_s else []]
    c_params, c_grads, (c_duals, c_ms, c_ss), writeback = kernel_views(params, grads, used_states, group_sizes)

    counts = torch.zeros(len(params), dtype=torch.int64, device=device)
    buckets: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, (p, g) in enumerate(zip(c_params, c_grads)):
        buckets[(p.dtype, g.dtype)].append(i)

    cfg = launch_config(device)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, delta=delta, reg=reg)
    for (p_dtype, g_dtype), idx in buckets.items():
        sizes = tuple((c_params[i].numel(), group_sizes[i]) for i in idx)
        entries, num_entries = _entries_cache.get_or_build(
            (device, row_kernel, cfg, sizes), lambda: _build_entries(sizes, row_kernel, cfg, device), "entries_builds")
        if num_entries == 0:
            continue

        infos = tuple(zip(_addresses(c_params, idx), _addresses(c_grads, idx), _addresses(c_duals, idx),
                          _addresses(c_ms, idx), _addresses(c_ss, idx), *zip(*sizes), idx))
        table, aligned = _table_cache.get_or_build((device, p_dtype, g_dtype, cfg, infos),
                                                   lambda: _build_table(infos, cfg, device), "table_builds")
        _keep_if_captured(device, table, entries)
        shapes = [params[i].shape for i in idx]
        if capturable:
            hp = _device_hyper(kind, [steps[i] for i in idx], shapes=shapes, device=device, **hyper)
        else:
            hp = _host_hyper(kind, [step_counts[i] for i in idx], shapes=shapes, device=device, **hyper)
        s_dtype = _state_dtype(c_params[idx[0]])
        args = (table, entries, hp, counts,
                grad_scale_dev if grad_scale_dev is not None else hp,
                found_inf_dev if found_inf_dev is not None else hp)
        meta = dict(KIND=KINDS[kind], REG=REGS[reg.kind], MOMENTUM=bool(kind == "linbreg" and beta1 > 0),
                    HAS_GRAD_SCALE=grad_scale_dev is not None, HAS_FOUND_INF=found_inf_dev is not None,
                    P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], S_DTYPE=_TL_DTYPES[s_dtype])
        options = {} if interpreting() else {"enable_fp_fusion": False}
        stats["launches"] += 1
        with _current_device(device):
            if row_kernel:
                kernels.row_kernel[(num_entries,)](*args, **meta, BLOCK=cfg.row_block,
                                                   NUM_CLASSES=cfg.num_row_classes,
                                                   num_warps=cfg.row_num_warps, **options)
            else:
                kernels.elementwise_kernel[(num_entries,)](*args, **meta, BLOCK=cfg.block, ALIGNED=aligned,
                                                           num_warps=cfg.num_warps, **options)

    for orig, copy in writeback:  # after a skipped step this copies unchanged values back
        orig.copy_(copy)
    if capturable:
        if found_inf_dev is not None:  # undo the increment of a skipped step, still without a host read
            skipped = (found_inf_dev != 0).to(torch.float32)
            torch._foreach_sub_(steps, [skipped] * len(steps))
        return counts
    if found_inf_dev is not None and bool(found_inf.item()):
        return None
    torch._foreach_add_(steps, 1.0)
    return counts
