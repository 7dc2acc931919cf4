"""Triton backend: multi-tensor fused kernels, one launch per (param group, dtype) bucket.

``step`` has exactly the signature and return of ``bregman_fused.reference.step`` and can be called
directly on lists of tensors (e.g. from benchmarks). It runs on CUDA tensors, or on CPU tensors when
Triton's interpreter is on (``TRITON_INTERPRET=1`` set before this package is imported; slow, for
tests only). Kernels: ``kernels.py``; tables, caches and launch: ``launcher.py``.
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


def step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, delta, reg,
         grad_scale=None, found_inf=None, capturable=False):
    """Same contract as ``bregman_fused.reference.step`` (see there)."""
    if _launcher is None:
        raise RuntimeError(f"backend='triton' cannot run here: triton could not be imported ({_import_error})")
    return _launcher.step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1,
                          beta2=beta2, eps=eps, delta=delta, reg=reg, grad_scale=grad_scale, found_inf=found_inf,
                          capturable=capturable)
