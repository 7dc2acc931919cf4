"""Loads the compiled C++/CUDA ops (registered as torch.ops.bregman_fused.*); native.py calls them.

Loading follows the apex/torchao habit: try the module built at install (``bregman_fused._C``);
if it is missing, or was built from other sources than the csrc/ next to it (an edit since the
install, _build.py [note: stale builds]), JIT-build it from csrc/ with
``torch.utils.cpp_extension.load`` (ninja; build folder under TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) on first use; if that fails too, remember why. A stale CUDA module is
not loaded (there is no JIT build for it). ``cpu_available()`` is then False and ``cpu_error()`` says why:
backends.select falls back on "auto" (one warning) and raises for backend="cpu".
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

from .. import _build
from . import fake_kernels

__all__ = ["cpu_available", "cpu_error", "cuda_available", "cuda_error", "require_cpu", "require_cuda"]

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
        if state is not None:
            fake_kernels.register("fused_step")
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
    if _cuda.ok:
        fake_kernels.register("fused_step_capturable")
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


def _require(state: _LoadState, what: str) -> None:
    if not state.ok:
        raise RuntimeError(f"the {what} extension could not be loaded: {state.error}")



def require_cpu() -> None:
    _require(_load_cpu(), "C++ CPU")


def require_cuda() -> None:
    _require(_load_cuda(), "CUDA")
