"""Triton backend: multi-tensor fused kernels, one launch per (param group, dtype) bucket.

``step`` keeps the backend contract (backends/contract.py; ``reference.step`` is the spec). It runs
on CUDA tensors, or on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before
this package is imported; slow, for tests only). Files: ``bregman_math.py`` (per-element math, codes,
hyper columns), ``kernels.py`` (the two kernels), ``moment_math.py`` and ``moment_kernels.py``
(compact moments: bf16 and 8-bit codes, the 8-bit block kernel), ``tables.py`` (launch tables and
their caches), ``launcher.py`` (checks and launch).
"""
from __future__ import annotations

import os

import torch

__all__ = ["step", "unavailable_reason"]

_import_error: str | None = None
try:
    from . import launcher as _launcher
except Exception as e:  # triton missing or broken: keep the reason, raise it only when asked for
    _launcher = None
    _import_error = f"{type(e).__name__}: {e}"


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when ``step`` can update tensors on ``device``; otherwise why not."""
    device = torch.device(device)
    if _launcher is None:
        return f"triton could not be imported ({_import_error})"
    if _launcher.interpreting():
        if device.type == "cpu":
            return None
        # the interpreter copies kernel arguments to the host, but not the tensors behind the
        # addresses of the pointer table
        return (f"TRITON_INTERPRET=1 runs Triton kernels on the CPU and cannot reach {device} tensors; "
                "unset TRITON_INTERPRET for GPU tensors")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        return None
    hint = ("" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else
            " (TRITON_INTERPRET was set after bregman_fused.triton was imported: set it before)")
    return (f"backend 'triton' runs on CUDA tensors, got tensors on {device}; for CPU tensors set "
            f"TRITON_INTERPRET=1 before importing bregman_fused (tests only){hint}")


def step(tensors, hyper, reg, **amp):
    """The backend contract's step (backends/contract.py) on Triton kernels."""
    if _launcher is None:
        raise RuntimeError(f"backend='triton' cannot run here: triton could not be imported ({_import_error})")
    return _launcher.step(tensors, hyper, reg, **amp)
