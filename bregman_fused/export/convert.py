"""``to_sparse``: Linear layers with CSR weights where that is faster, the same outputs.

Which layers: by default a calibrated rule, ``density <= DENSITY_THRESHOLD`` and at least
``MIN_NUMEL`` weights. Calibrated on the 2-core CPU (torch 2.14.1, one thread, a 4096×4096 layer,
``benchmarks/bench_inference.py --calibrate``, 2026-11-30): CSR (``SparseLinear``) against the
fastest dense path, oneDNN, breaks even at ~20–25 % density at batch 1, ~20 % at batch 32 and
~9.5 % at batch 256 (at 10 % it took 80 ms against oneDNN's 74 ms and dense ``F.linear``'s 185 ms);
so 8 % keeps CSR faster than both dense paths at every batch size measured. Small layers pay the
sparse call's fixed cost (~5 µs against 2–3 µs for a dense 200×64 ``F.linear`` at batch 1): below
~64 Ki weights CSR loses at batch 1 even at 3 % density (it still wins at batch 256), hence
``MIN_NUMEL``.

``measure_batch=B`` instead times both forms of each layer at batch size B on random inputs and
keeps the faster one (medians of interleaved runs): for a machine or batch size the rule was not
calibrated on. Conv layers stay dense: torch has no CPU sparse-weight convolution, and unfold + CSR
matmul was slower than the dense conv (issue 16); ``shrink`` is what makes convs cheaper.
"""
from __future__ import annotations

import copy
import functools
import statistics
import time
import warnings

import torch
from torch import nn

from .errors import ExportError
from .graph import CONV
from .shrink import TRAIN_MODE_NOTE
from .sparse_linear import SparseLinear, to_csr

__all__ = ["to_sparse", "DENSITY_THRESHOLD", "MIN_NUMEL", "decide"]

DENSITY_THRESHOLD = 0.08
MIN_NUMEL = 65536


def _density(w: torch.Tensor) -> float:
    return float(torch.count_nonzero(w)) / w.numel() if w.numel() else 1.0


def _median_us(fn, x: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


@torch.no_grad()
def _measure(lin: nn.Linear, sparse: SparseLinear, batch: int, reps: int = 15) -> tuple[float, float]:
    """(dense µs, CSR µs) per call at ``batch``, interleaved so that load hits both alike."""
    x = torch.randn(batch, lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device)
    for _ in range(3):  # warm-up (MKL's first sparse call analyses the matrix)
        lin(x), sparse(x)
    dense, csr = [], []
    for _ in range(3):
        dense.append(_median_us(lin, x, reps))
        csr.append(_median_us(sparse, x, reps))
    return statistics.median(dense), statistics.median(csr)


@functools.lru_cache(maxsize=None)
def csr_unsupported(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why torch cannot multiply a CSR matrix of ``dtype`` on ``device`` (SparseLinear's two calls,
    batch 1 and batch > 1), or None. Probed, not listed: which dtypes have kernels differs by
    device and torch version (torch 2.14's CPU CSR matmul has none for bf16/fp16)."""
    weight = to_csr(torch.eye(2, dtype=dtype, device=device))
    try:
        torch.mv(weight, torch.ones(2, dtype=dtype, device=device))
        torch.sparse.mm(weight, torch.ones(2, 2, dtype=dtype, device=device))
    except (NotImplementedError, RuntimeError) as e:
        return f"torch has no {device.type} CSR matmul for {dtype} ({str(e).splitlines()[0][:80]})"
    return None


def decide(lin: nn.Linear, threshold: float = DENSITY_THRESHOLD, min_numel: int = MIN_NUMEL,
           measure_batch: int | None = None) -> tuple[bool, str]:
    """(whether ``lin`` should become CSR, why), by the calibrated rule or by a measurement."""
    d = _density(lin.weight)
    unsupported = csr_unsupported(lin.weight.dtype, lin.weight.device)
    if unsupported is not None:
        return False, f"density {d:.4f}, but {unsupported}"
    if measure_batch is not None:
        dense_us, csr_us = _measure(lin, SparseLinear.from_linear(lin), measure_batch)
        return csr_us < dense_us, (f"density {d:.4f}; measured at batch {measure_batch}: dense {dense_us:.1f} µs, "
                                   f"csr {csr_us:.1f} µs")
    n = lin.weight.numel()
    if d > threshold:
        return False, f"density {d:.4f} > {threshold:g}: dense is faster"
    if n < min_numel:
        return False, f"density {d:.4f} but only {n} weights (< {min_numel}): the sparse call's fixed cost loses"
    return True, f"density {d:.4f} <= {threshold:g}"


def to_sparse(model: nn.Module, *, threshold: float = DENSITY_THRESHOLD, min_numel: int = MIN_NUMEL,
              measure_batch: int | None = None) -> nn.Module:
    """A copy of ``model`` (eval mode) whose ``nn.Linear`` layers are ``SparseLinear`` (CSR) where
    faster: by the calibrated rule (``threshold``, ``min_numel``), or by timing each layer at batch
    size ``measure_batch``. Same outputs (up to summation order, ~1e-6 relative in fp32); the
    decisions are in the copy's ``export_notes``. Inference only: the CSR weights are buffers."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not 0.0 <= threshold <= 1.0:
        raise ExportError(f"threshold is a density (fraction of non-zeros) in [0, 1], got {threshold}")
    if measure_batch is not None and (not isinstance(measure_batch, int) or measure_batch < 1):
        raise ExportError(f"measure_batch must be a positive batch size or None, got {measure_batch!r}")
    notes = list(getattr(model, "export_notes", []))
    if model.training:
        warnings.warn(TRAIN_MODE_NOTE, UserWarning, stacklevel=2)
        notes.insert(0, TRAIN_MODE_NOTE)
    fast = copy.deepcopy(model).eval()
    convs = []
    for name, m in list(fast.named_modules()):
        for child_name, child in list(m.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear:  # subclasses (e.g. attention's) may be read by their parent directly
                if child.weight.layout != torch.strided or child.weight.dim() != 2:
                    continue
                use, why = decide(child, threshold, min_numel, measure_batch)
                if use:
                    setattr(m, child_name, SparseLinear.from_linear(child))
                notes.append(f"{full}: {'csr' if use else 'dense'} ({why})")
            elif isinstance(child, CONV):
                convs.append(full)
    if convs:
        notes.append(f"{len(convs)} conv layer(s) stay dense: torch has no faster CPU sparse-weight convolution "
                     "(shrink removes their dead channels)")
    fast.export_notes = notes
    return fast
