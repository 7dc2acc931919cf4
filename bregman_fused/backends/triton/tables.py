"""Host-side tables of the Triton backend and their caches: launch configuration, work entries,
pointer tables and hyper-parameter tables.

[note: table caches] The kernels reach the tensors through two int64 device tensors: ``table``
(one row per tensor: base addresses, numel, row length, ...) and ``entries`` (one row per program:
tensor, first and end element or row). ``entries`` depends only on the tensors' sizes and is
cached by them; ``table`` depends on the data pointers and is cached by (device, dtypes,
data_ptrs, sizes): the same tensors reuse the uploaded table, a re-allocated tensor (new data_ptr)
or a different tensor list builds a new one, so a stale pointer is never used. A table never
keeps a tensor alive; equal addresses with equal sizes mean an equal table. The per-step values
(lr, bias corrections, thresholds) live in a separate small float64 table, cached per setting with
AdaBreg's bias corrections filled in per step — changing lr never recompiles.

[note: launch rule] GPU, element-wise kernel: BLOCK = 2048 elements with 8 warps (8 fp32 per
thread = two 128-bit accesses per tensor), and a chunk per program of BLOCK·k elements, k chosen
so that there are about 8 programs per SM, capped at 32 blocks (65536 elements) per program; e.g.
100 M elements → ~1500 programs of 64 Ki elements. GPU, row kernel: tiles of 4096 elements (R rows
× C columns, C a power of 4 ≥ n), 8 warps, about ``chunk`` elements per program. GPU, 8-bit
moments kernel: tiles of ``code_blocks`` = 8 blocks of 256 elements, 8 warps, whole blocks per
program by the element-wise rule. Under the interpreter (CPU, tests) the blocks are 1024 elements
(4 blocks of 256 for 8-bit moments) and chunks as large as possible: the interpreter pays per
program and per op, not per element.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass

import torch

from ...regularizers import Regularizer
from .. import moments
from ..contract import Hyper, Kind, RegCode
from . import kernels
from .bregman_math import HYPER_COLUMNS

# counters for tests and debugging: kernel launches and table (re)builds
stats: collections.Counter = collections.Counter()


@dataclass(frozen=True)
class LaunchConfig:
    block: int  # element-wise kernel: elements per block
    num_warps: int
    row_block: int  # row kernel: elements per [R, C] tile, a power of 4
    row_num_warps: int
    max_chunk: int  # most elements (or row-tile elements) per program
    programs_per_sm: int
    code_blocks: int = 8  # 8-bit moments kernel: 256-element blocks per [NB, 256] tile, a power of 2

    @property
    def num_row_classes(self) -> int:
        return int(round(math.log(self.row_block, 4))) + 1


GPU_CONFIG = LaunchConfig(block=2048, num_warps=8, row_block=4096, row_num_warps=8, max_chunk=65536,
                          programs_per_sm=8)
INTERPRETER_CONFIG = LaunchConfig(block=1024, num_warps=1, row_block=1024, row_num_warps=1, max_chunk=1 << 22,
                                  programs_per_sm=1, code_blocks=4)


def launch_config(device: torch.device) -> LaunchConfig:
    return INTERPRETER_CONFIG if kernels.INTERPRETING else GPU_CONFIG


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk(total: int, granule: int, cfg: LaunchConfig, device: torch.device) -> int:
    """Elements per program: enough programs to fill the device, at most cfg.max_chunk. [note: launch rule]"""
    if kernels.INTERPRETING:
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


def build_entries(sizes, row_kernel: bool, cfg: LaunchConfig, device: torch.device):
    """(tensor, start, end) per program: element ranges, or row ranges for the row kernel."""
    refuse_upload_under_capture(device, "work list")
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


def build_code_entries(sizes, cfg: LaunchConfig, device: torch.device):
    """(tensor, first block, end block) per program of the 8-bit moments kernel (moment_kernels.py):
    ``sizes`` holds (numel, row length L) per tensor, blocks are numbered row-major, ceil(L/256)
    per dim-0 row. Whole blocks per program; chunked by the element rule of ``_chunk``."""
    refuse_upload_under_capture(device, "work list")
    blocks = [numel // row_len * -(-row_len // moments.BLOCK) if numel else 0 for numel, row_len in sizes]
    chunk = _chunk(sum(blocks) * moments.BLOCK, cfg.code_blocks * moments.BLOCK, cfg, device) // moments.BLOCK
    rows = [(t, b, min(b + chunk, n)) for t, n in enumerate(blocks) for b in range(0, n, chunk)]
    if not rows:
        return None, 0
    return torch.tensor(rows, dtype=torch.int64).to(device), len(rows)


def code_row_len(shape) -> int:
    """The length of a dim-0 row of an 8-bit moment, the unit its blocks follow (moments.scale_shape)."""
    return math.prod(shape[1:]) if len(shape) else 1


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_upload_under_capture(device: torch.device, what: str) -> None:
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


def keep_if_captured(device: torch.device, *tensors: torch.Tensor) -> None:
    if _capturing(device):
        _kept_for_graphs.extend(tensors)


def build_table(infos, cfg: LaunchConfig, device: torch.device):
    """The uploaded pointer table, and whether every address in it is 16-byte aligned (the
    element-wise kernel's vector path): both functions of the addresses, cached together."""
    refuse_upload_under_capture(device, "pointer table")
    rows = [(p, g, v, m, s, numel, n, slot, _row_class(n, cfg), m_scale, s_scale, code_len)
            for p, g, v, m, s, numel, n, slot, m_scale, s_scale, code_len in infos]
    table = torch.tensor(rows, dtype=torch.int64)
    assert table.shape[1] == kernels.TABLE_COLS
    aligned = all(a % 16 == 0 for info in infos for a in info[:5])
    return table.to(device), aligned


# ---- per-step hyper-parameters [note: hyper table] ---------------------------------------------
def _hyper_rows(hyper: Hyper, reg: Regularizer, shapes, t: float = 1.0) -> list[list[float]]:
    """One float64 row per tensor, each column the ``Hyper`` constant it is named after
    (bregman_math.HYPER_COLUMNS), in double exactly as reference.py computes them, at step count t."""
    lamda_l1, lamda_group = reg.lamdas()
    row_map = RegCode.of(reg.kind).is_row_map
    common = dict(lr=float(hyper.lr), beta1=hyper.beta1, one_minus_beta1=hyper.one_minus_beta1, beta2=hyper.beta2,
                  one_minus_beta2=hyper.one_minus_beta2, eps=hyper.eps, mom_scale=hyper.mom_scale,
                  step_size=hyper.step_size(t), bc2_sqrt=hyper.bc2_sqrt(t), prox_delta=hyper.prox_delta,
                  thr_l1=hyper.thr_l1(lamda_l1))
    rows, by_size = [], {}
    for shape in shapes:
        n = reg.group_size(shape) if row_map else 0
        row = by_size.get(n)
        if row is None:
            values = dict(common, thr_row=hyper.thr_row(lamda_group, n) if row_map else 0.0)
            row = by_size[n] = [values[c] for c in HYPER_COLUMNS]
        rows.append(row)
    return rows


# Columns that hold lr or a multiple of it (thresholds only for ProxSGD), and the two that depend
# on the step count t.
_LR_COLS = tuple(HYPER_COLUMNS.index(c) for c in ("lr", "mom_scale"))
_PROX_SGD_LR_COLS = tuple(HYPER_COLUMNS.index(c) for c in ("thr_l1", "thr_row"))
_STEP_SIZE_COL, _BC2_SQRT_COL = HYPER_COLUMNS.index("step_size"), HYPER_COLUMNS.index("bc2_sqrt")
assert _BC2_SQRT_COL == _STEP_SIZE_COL + 1  # filled as one slice per step


def device_hyper(hyper: Hyper, reg: Regularizer, steps, shapes, device):
    """The hyper table of ``_hyper_rows`` built on the device from device step counts and a device lr,
    with tensor ops only (no host read, nothing uploaded while a CUDA graph is captured).
    [note: capturable] The lr-free part is ``_hyper_rows`` with lr = 1, built once per setting and
    cached; the lr columns are products with lr and the bias corrections are formed in float64 on
    the device, within an ulp or so of the host's double (docs/design.md [note: device bias corrections])."""
    unit = dataclasses.replace(hyper, lr=1.0)
    key = ("hyper", device, unit, repr(reg.to_dict()), tuple(map(tuple, shapes)))
    base, lr_mask = _hyper_base_cache.get_or_build(key, lambda: _hyper_base(unit, reg, shapes, device),
                                                   "hyper_builds")
    lr = hyper.lr
    lr_t = lr.to(torch.float64) if isinstance(lr, torch.Tensor) else torch.full((), float(lr), dtype=torch.float64,
                                                                                  device=device)
    keep_if_captured(device, base, lr_mask)
    hp = base * torch.where(lr_mask, lr_t.reshape(()), 1.0)
    if hyper.kind == Kind.ADABREG:
        t = torch.stack([s.reshape(()) for s in steps]).to(torch.float64)
        hp[:, _STEP_SIZE_COL] = lr_t / (1.0 - torch.pow(hyper.beta1, t))
        hp[:, _BC2_SQRT_COL] = torch.sqrt(1.0 - torch.pow(hyper.beta2, t))
    return hp


def _hyper_base(unit: Hyper, reg, shapes, device):
    refuse_upload_under_capture(device, "hyper-parameter table (β, ε, δ or λ changed)")
    rows = _hyper_rows(unit, reg, shapes)
    cols = _LR_COLS + (_PROX_SGD_LR_COLS if unit.kind == Kind.PROXSGD else ())
    mask = torch.zeros(len(rows[0]), dtype=torch.bool)
    mask[list(cols)] = True
    return torch.tensor(rows, dtype=torch.float64).to(device), mask.to(device)


def sr_steps(steps, step_counts, capturable: bool, device: torch.device) -> torch.Tensor:
    """Each tensor's step count (float32, one per table row) for the random bits of bf16 moments:
    capturable, stacked from the device counters by a device op (nothing read on the host); else
    uploaded from the counts already read on the host."""
    if capturable:
        return torch.stack([s.reshape(()) for s in steps]).to(torch.float32)
    return _upload(step_counts, torch.float32, device)


def host_hyper(hyper: Hyper, reg: Regularizer, step_counts, shapes, device):
    """The hyper table of ``_hyper_rows`` on the device, from host step counts and a host lr.
    Only AdaBreg's two bias-correction columns change with the step count: the rest is built once
    per setting and cached (on the device for the other kinds, which then upload nothing per
    step); AdaBreg's columns are computed in double per distinct count."""
    refuse_upload_under_capture(device, "hyper-parameter table from host values (capturable=False)")
    key = ("host", device, hyper, repr(reg.to_dict()), tuple(shapes))
    if hyper.kind != Kind.ADABREG:
        return _host_hyper_cache.get_or_build(
            key, lambda: _upload(_hyper_rows(hyper, reg, shapes), torch.float64, device), "hyper_builds")
    base = _host_hyper_cache.get_or_build(
        key, lambda: torch.tensor(_hyper_rows(hyper, reg, shapes), dtype=torch.float64), "hyper_builds")
    per_count = {t: (hyper.step_size(t), hyper.bc2_sqrt(t)) for t in set(step_counts)}
    rows = base.pin_memory() if device.type == "cuda" else base.clone()  # a fresh buffer per step
    rows[:, _STEP_SIZE_COL:_BC2_SQRT_COL + 1] = torch.tensor([per_count[t] for t in step_counts], dtype=torch.float64)
    return rows.to(device, non_blocking=True) if device.type == "cuda" else rows


def _upload(rows, dtype, device: torch.device) -> torch.Tensor:
    refuse_upload_under_capture(device, "hyper-parameter table from host values (capturable=False)")
    host = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host
