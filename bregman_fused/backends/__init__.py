"""The backends and the ONE place that chooses among them (``select``).

Every backend keeps the contract of contract.py (``reference.step`` is the spec). ``select``
returns a ``Backend`` record that states what the backend can do, so that the optimizers ask
capabilities and never name a backend.

=============  ==========================================  ===========  ============  ====================
name           what runs                                   capturable   compiled op   regularizers
=============  ==========================================  ===========  ============  ====================
``reference``  per-tensor PyTorch (reference.py)           no           no            all (incl. Nuclear)
``cpu``        fused C++ op on CPU tensors (native.py)     no           yes           the built-in ones
``cuda``       fused CUDA op on CUDA tensors (native.py)   yes          yes           the built-in ones
``triton``     fused Triton kernels (triton/)              yes          no            the built-in ones
=============  ==========================================  ===========  ============  ====================

"capturable": a capturable step reads nothing on the host, so it can be recorded in a CUDA graph.
"compiled op": checks every argument in C++ before it writes, and adds its CPU step counters itself
(contract.begin_step [note: who adds]). "built-in": regularizers.runs_builtin_map.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..regularizers import Regularizer, runs_builtin_map
from . import loader, native, reference
from .contract import StepFn, check_amp, check_tensors, fused_code
from .moments import FORMATS

__all__ = ["NAMES", "CAPTURABLE", "Backend", "select", "prepare", "check_name", "unavailable_reason"]

NAMES = ("auto", "reference", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class Backend:
    """A backend chosen to update one (device, dtype) bucket, and what it can do."""

    name: str
    step: StepFn
    capturable: bool  # can be recorded in a CUDA graph: reads nothing on the host
    fused_regs_only: bool  # implements only the built-in regularizers with a kernel (contract.fused_code)
    # a compiled op: it adds the step counters that live on the CPU itself (contract.begin_step
    # [note: who adds])
    compiled_op: bool = False
    # checks every argument itself before it writes anything (the reference computes tensor by
    # tensor and is checked by its caller, functional.fused_step)
    checks_before_writes: bool = True
    # the dtypes of params and grads it takes; None: any floating dtype
    dtypes: tuple[torch.dtype, ...] | None = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    # the moment formats it stores (moments.py)
    moments: tuple[str, ...] = FORMATS

    def check(self, tensors, hyper, grad_scale=None, found_inf=None) -> None:
        """Every check of a step on ``tensors`` without running it (raises; writes nothing): how a
        step refuses before anything (a count, an earlier bucket) is written."""
        check_tensors(tensors, hyper, self.dtypes)
        check_amp(grad_scale, found_inf)

    def implements(self, reg: Regularizer) -> bool:
        return not self.fused_regs_only or fused_code(reg) is not None


# [note: triton under compile] The launcher packs tensor addresses (data_ptr) into launch tables,
# which dynamo cannot trace: under torch.compile the Triton step runs eagerly, as a graph break
# (fullgraph=True refuses it; the cpu/cuda ops are opaque custom ops and trace whole).
@torch.compiler.disable
def _triton_step(tensors, hyper, reg, **amp):
    from . import triton as triton_backend  # imported on first use: importing Triton takes seconds

    return triton_backend.step(tensors, hyper, reg, **amp)


_REFERENCE = Backend("reference", reference.step, capturable=False, fused_regs_only=False, dtypes=None,
                     checks_before_writes=False)
_FUSED = {
    "cpu": Backend("cpu", native.cpu_step, capturable=False, fused_regs_only=True, compiled_op=True,
                   moments=native.CPU_MOMENTS),
    "cuda": Backend("cuda", native.cuda_step, capturable=True, fused_regs_only=True, compiled_op=True,
                    moments=native.CUDA_MOMENTS),
    "triton": Backend("triton", _triton_step, capturable=True, fused_regs_only=True),
}

CAPTURABLE = tuple(name for name, b in _FUSED.items() if b.capturable)


def prepare(backend: str, devices) -> None:
    """Load (or JIT-build) the compiled extensions ``select`` may pick for tensors on ``devices``,
    without raising: the optimizers call it when they are made, so that a step (eager or under
    torch.compile) finds them loaded; what failed is reported by ``select`` at the step."""
    if backend in ("auto", "cpu") and any(d.type == "cpu" for d in devices):
        loader.cpu_available()
    if backend in ("auto", "cuda") and any(d.type == "cuda" for d in devices):
        loader.cuda_available()


def check_name(backend: str) -> str:
    if backend not in NAMES:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {NAMES}")
    return backend


def unavailable_reason(name: str, device: torch.device, reg: Regularizer, moments: str = "fp32") -> str | None:
    """Why fused backend ``name`` cannot update tensors on ``device`` with ``reg`` and moments stored
    as ``moments``; None if it can."""
    if not _FUSED[name].implements(reg):
        return _no_kernel_reason(reg)
    if moments not in _FUSED[name].moments:
        return f"backend {name!r} does not implement {moments} moments (it stores {list(_FUSED[name].moments)})"
    if name in ("cpu", "cuda"):
        if device.type != name:
            return f"backend {name!r} updates {name.upper()} tensors, got tensors on {device}"
        if name == "cpu":
            return None if loader.cpu_available() else f"the C++ CPU extension could not be loaded: {loader.cpu_error()}"
        return None if loader.cuda_available() else f"the CUDA extension could not be loaded: {loader.cuda_error()}"
    from . import triton as triton_backend

    return triton_backend.unavailable_reason(device)


def _no_kernel_reason(reg: Regularizer) -> str:
    if not runs_builtin_map(reg):
        return (f"{type(reg).__name__} is a user-defined regularizer: a fused kernel would run the built-in "
                f"{reg.kind!r} map instead of its own, so only backend='reference' runs it (if it does not change "
                f"the math, say so with `keeps_builtin_map = True` in the body of class {type(reg).__name__})")
    return (f"the {type(reg).__name__} regularizer has no fused kernel (kind {reg.kind!r}); "
            "only backend='reference' implements it")


_warned_fallback: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(f"bregman_fused: {message}", RuntimeWarning, stacklevel=4)


def select(backend: str, device: torch.device, reg: Regularizer, moments: str = "fp32") -> Backend:
    """The single place that maps a requested backend to the one that will run.

    ``"auto"`` takes the first fused backend that can run (``cuda`` then ``triton`` on GPUs,
    ``cpu`` on CPUs) and falls back to the reference quietly, except for a one-time warning when
    a compiled extension exists in principle but failed to load, and one per user-defined
    regularizer class (its own map runs on the reference, regularizers.Regularizer). ``cuda`` comes first because its
    host cost per step is a quarter of Triton's (H100: 0.36 vs 1.6 ms on ResNet-18), which
    decides small models; on large lists Triton's single launch is ~7 % faster on the GPU.
    A named backend that cannot run raises with the reason.
    """
    check_name(backend)
    if backend == "reference":
        return _REFERENCE
    if backend == "auto":
        if not runs_builtin_map(reg):  # a user-defined map: the spec runs it, whatever the device
            _warn_once(f"class {type(reg).__qualname__}", f"backend='auto' runs the params regularized by "
                                                          f"{type(reg).__name__} on the reference: {_no_kernel_reason(reg)}")
            return _REFERENCE
        candidates = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for name in candidates:
            if unavailable_reason(name, device, reg, moments) is None:
                return _FUSED[name]
        if device.type == "cpu" and _FUSED["cpu"].implements(reg):
            _warn_once("cpu", f"falling back to the reference backend ({unavailable_reason('cpu', device, reg, moments)})")
        return _REFERENCE
    reason = unavailable_reason(backend, device, reg, moments)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run here: {reason}")
    return _FUSED[backend]
