"""Loads the compiled C++/CUDA ops and wraps them in reference.step's signature.

Loading follows the apex/torchao habit: try the module built at install (``bregman_fused._C``);
if it is missing, or was built from other sources than the csrc/ next to it (an edit since the
install, _build.py [note: stale builds]), JIT-build it from csrc/ with
``torch.utils.cpp_extension.load`` (ninja; build folder under TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) on first use; if that fails too, remember why. A stale CUDA module is
not loaded (there is no JIT build for it). ``cpu_available()`` is then False and ``cpu_error()`` says why:
functional.select_backend falls back on "auto" (one warning) and raises for backend="cpu".
Everything is loaded once and cached.

Switches (environment): BREGMAN_FUSED_NO_JIT=1 never JIT-builds (the installed module or nothing).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import _build
from ._layout import kernel_views

__all__ = ["cpu_available", "cpu_error", "cpu_step", "cuda_available", "cuda_error", "cuda_step",
           "KIND_CODES", "REG_CODES"]

# bregman::Kind and bregman::Reg in csrc/bregman_math.h
KIND_CODES = {"linbreg": 0, "adabreg": 1, "proxsgd": 2}
REG_CODES = {"none": 0, "l1": 1, "l1pos": 2, "group": 3, "sparse_group": 4}
_ROW_REGS = ("group", "sparse_group")
JIT_NAME = "bregman_fused_cpu"


@dataclass
class _LoadState:
    """Result of one load attempt: the module, or the error that explains why there is none."""

    module: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.module is not None


_lock = threading.Lock()
_cpu: _LoadState | None = None  # None: not tried yet
_cuda: _LoadState | None = None


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _jit_build():
    from torch.utils.cpp_extension import load

    root = _build.source_root()
    sources = _build.cpu_sources(root)
    if not os.path.exists(sources[0]):
        raise FileNotFoundError(f"no C++ sources to JIT-build from (looked for {sources[0]})")
    return load(name=JIT_NAME, sources=sources, extra_include_paths=_build.include_dirs(root),
                extra_cflags=_build.cpu_cxx_flags() + _build.source_hash_flags(root),
                extra_ldflags=_build.cpu_link_flags(), verbose=os.environ.get("BREGMAN_FUSED_VERBOSE") == "1")


def _stale_reason(module_name: str) -> str | None:
    """Why the installed binary of ``module_name`` must not be imported: it was built from other
    sources than the csrc/ beside it. Checked on the file, before importing (the import registers
    the ops for good). None when it is current, or when there is nothing to compare."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None  # not built: the import reports that
    root = _build.source_root()
    current = _build.source_hash(root)
    if current is None:
        return None
    built = _build.built_source_hash(spec.origin)
    if built == current:
        return None
    return (f"{spec.origin} was built from other sources than {os.path.join(root, 'csrc')} (digest {built}, "
            f"sources {current}): csrc/ changed since the install; run `pip install --no-build-isolation -e .` "
            "again")


def _load_cpu() -> _LoadState:
    global _cpu
    if _cpu is not None:
        return _cpu
    with _lock:
        if _cpu is not None:
            return _cpu
        errors = []
        state = None
        stale = _stale_reason(_build.CPU_MODULE)
        if stale is not None:
            errors.append(stale)
        else:
            try:
                state = _LoadState(module=importlib.import_module(_build.CPU_MODULE))
            except Exception as exc:  # ImportError, or an OSError/undefined symbol from a broken build
                errors.append(f"import {_build.CPU_MODULE} failed ({_describe(exc)})")
        if state is None:
            if os.environ.get("BREGMAN_FUSED_NO_JIT") == "1":
                errors.append("JIT build disabled by BREGMAN_FUSED_NO_JIT=1")
            else:
                try:
                    state = _LoadState(module=_jit_build())
                except Exception as exc:
                    errors.append(f"JIT build failed ({_describe(exc)})")
                else:
                    if stale is not None:
                        warnings.warn(f"bregman_fused: JIT-built the C++ extension from the current sources: {stale}",
                                      RuntimeWarning, stacklevel=2)
        if state is not None and not hasattr(torch.ops.bregman_fused, "fused_step"):
            errors.append("the extension loaded but did not register torch.ops.bregman_fused.fused_step")
            state = None
        _cpu = state if state is not None else _LoadState(error="; ".join(errors))
        return _cpu


def _load_cuda() -> _LoadState:
    global _cuda
    if _cuda is not None:
        return _cuda
    with _lock:
        if _cuda is not None:
            return _cuda
        stale = _stale_reason(_build.CUDA_MODULE)
        if stale is not None:
            state = _LoadState(error=stale)
        else:
            try:
                state = _LoadState(module=importlib.import_module(_build.CUDA_MODULE))
            except Exception as exc:
                state = _LoadState(error=f"import {_build.CUDA_MODULE} failed ({_describe(exc)})")
        _cuda = state
    if _cuda.ok and not _load_cpu().ok:  # the op schema lives in the CPU module
        _cuda = _LoadState(error=f"the CUDA kernels need the op schemas of {_build.CPU_MODULE}: {_load_cpu().error}")
    return _cuda


def cpu_available() -> bool:
    return _load_cpu().ok


def cpu_error() -> str | None:
    """Why the C++ CPU extension is unavailable (None when it loaded)."""
    return _load_cpu().error


def cuda_available() -> bool:
    return _load_cuda().ok


def cuda_error() -> str | None:
    return _load_cuda().error


def fused_step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, delta, reg,
               grad_scale=None, found_inf=None, capturable=False):
    """reference.step on the compiled op (CPU or CUDA: the dispatcher routes by the tensors' device).

    The op walks every tensor as flat memory: contiguous ones, and dense ones (e.g. channels_last)
    whose partners share their strides, go in as they are; other layouts go in as permuted views
    or copies, copied back here (_layout [note: dense views]). Returns the non-zeros of each new θ,
    or None when ``found_inf`` is set (like the reference). ``capturable`` on CUDA tensors: the op ``fused_step_capturable`` with the steps and
    lr on the device and no host read at all (see reference.py [note: capturable]).
    """
    if kind not in KIND_CODES:
        raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {tuple(KIND_CODES)}")
    if reg.kind not in REG_CODES:
        raise ValueError(f"the fused backends do not implement the {type(reg).__name__} regularizer "
                         "(use backend='reference')")
    lamda_l1, lamda_group = reg.lamdas()
    row = reg.kind in _ROW_REGS
    group_sizes = [int(reg.group_size(p.shape)) if row else 1 for p in params]
    params_c, grads_c, states_c, writeback = kernel_views(params, grads, [duals, exp_avgs, exp_avg_sqs], group_sizes)
    # the AMP scalars may live elsewhere (GradScaler("cuda") with some CPU params): the op wants them
    # beside the params, as the reference's .to(g.device) does
    device = params[0].device if params else None
    if grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device)
    with torch.no_grad():
        if capturable and device is not None and device.type == "cuda":
            lr_t = _device_lr(lr, device)
            counts = torch.empty(len(params), dtype=torch.int64, device=device)
            torch.ops.bregman_fused.fused_step_capturable(
                KIND_CODES[kind], params_c, grads_c, states_c[0], states_c[1], states_c[2], list(steps), group_sizes,
                lr_t, float(beta1), float(beta2), float(eps), float(delta), REG_CODES[reg.kind], float(lamda_l1),
                float(lamda_group), grad_scale, found_inf, counts)
        else:
            # [note: one found_inf read] found_inf is read on the host ONCE per step, here, before
            # the launch (a sync on a GPU): a skipped step returns None untouched, as reference.step
            # does, and a step that runs passes no found_inf, so the op reads none (with CPU steps
            # the CUDA op would read it again to decide the increment, csrc/cuda/ops_cuda.cpp
            # [note: step counts]). Only capturable=True off the GPU returns the counts of a skipped
            # step: the op gets found_inf then, skips and counts the unchanged θ.
            skipped = found_inf is not None and bool(found_inf.item())
            if skipped and not capturable:
                return None
            counts = torch.ops.bregman_fused.fused_step(
                KIND_CODES[kind], params_c, grads_c, states_c[0], states_c[1], states_c[2], list(steps), group_sizes,
                float(lr), float(beta1), float(beta2), float(eps), float(delta), REG_CODES[reg.kind],
                float(lamda_l1), float(lamda_group), grad_scale, found_inf if skipped else None)
            if skipped:
                return counts  # nothing changed: nothing to copy back
        # a skipped capturable GPU step copies back unchanged values: harmless, and no host read
        for orig, c in writeback:
            orig.copy_(c)
    return counts


def _device_lr(lr, device: torch.device) -> torch.Tensor:
    """lr as the 0-dim device tensor a capturable op reads. A float becomes a fill kernel (its value
    is fixed in a captured graph, as in torch's optimizers); a tensor must already be there, since
    copying it from the host cannot be captured."""
    if not isinstance(lr, torch.Tensor):
        return torch.full((), float(lr), dtype=torch.float64, device=device)
    if lr.device != device:
        raise ValueError(f"lr must be on the params' device ({device}) with capturable=True, got {lr.device}")
    if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lr must be a one-element float32/float64 tensor, got {lr.dtype} with {lr.numel()} elements")
    return lr.reshape(())


def _require(state: _LoadState, what: str) -> None:
    if not state.ok:
        raise RuntimeError(f"the {what} extension could not be loaded: {state.error}")


def cpu_step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, delta, reg,
             grad_scale=None, found_inf=None, capturable=False):
    """Backend "cpu": reference.step's signature and return, on the fused C++ kernel."""
    _require(_load_cpu(), "C++ CPU")
    return fused_step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2,
                      eps=eps, delta=delta, reg=reg, grad_scale=grad_scale, found_inf=found_inf, capturable=capturable)


def cuda_step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, delta, reg,
              grad_scale=None, found_inf=None, capturable=False):
    """Backend "cuda": the same op; the dispatcher picks the CUDA kernel for CUDA tensors."""
    _require(_load_cuda(), "CUDA")
    return fused_step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2,
                      eps=eps, delta=delta, reg=reg, grad_scale=grad_scale, found_inf=found_inf, capturable=capturable)
