"""Loads the compiled C++/CUDA ops (registered as torch.ops.bregman_fused.*); native.py calls them.

Loading follows the apex/torchao habit: try the module built at install (``bregman_fused._C``);
if it is missing, or does not fit (built from other sources than the csrc/ next to it, or for
another torch than the one running: _build.py [note: build tag]), JIT-build it from csrc/ with
``torch.utils.cpp_extension.load`` (ninja; build folder under TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) on first use, saying so on stderr when it will compile; if that fails
too, remember why, the compiler's own words first. A CUDA module that does not fit is not loaded
(there is no JIT build for it). ``cpu_available()`` is then False and ``cpu_error()`` says why:
backends.select falls back on "auto" (one warning) and raises for backend="cpu".
Everything is loaded once and cached.

Switches (environment): BREGMAN_FUSED_NO_JIT=1 never JIT-builds (the installed module or nothing);
BREGMAN_FUSED_VERBOSE=1 shows the JIT build's commands.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import sys
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


def _is_command_line(line: str) -> bool:
    """A compiler or linker invocation echoed by ninja (many -flags), not a message."""
    return sum(token.startswith("-") for token in line.split()) >= 5


# what a compiler, linker or shell says when it stops: "x.cpp:3:10: fatal error: y.h: No such file
# or directory", "/bin/sh: 1: c++: not found", "undefined reference to ...", "Ninja is required ..."
_CAUSE = re.compile(r"error|not found|no such file|undefined reference|cannot|required|denied", re.IGNORECASE)
_NOISE = re.compile(r"^(\[\d+/\d+\]|FAILED:|ninja: build stopped|Error building extension)")


def _failure_cause(message: str, limit: int = 3) -> str:
    """The lines of a failed build's output that say why it failed, for the front of the error.
    torch's message is "Error building extension '...': " and ninja's whole output, in which each
    failed command is echoed (~1,000 characters) before the compiler's own words."""
    lines = [ln.strip() for ln in message.splitlines()]
    lines = [ln for ln in lines if ln and not _is_command_line(ln) and not _NOISE.match(ln)]
    causes = [ln for ln in lines if _CAUSE.search(ln)]
    picked = causes[:limit] or lines[-1:]
    return " | ".join(picked) if picked else message.strip()[:300]


def _jit_build_dir() -> str | None:
    """The folder torch.utils.cpp_extension.load builds JIT_NAME in (TORCH_EXTENSIONS_DIR, default
    ~/.cache/torch_extensions/<python>_<cuda>/); None if torch no longer has its private helper."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(JIT_NAME, verbose=False)
    except Exception:
        return None


def _jit_cached(build_dir: str | None, sources: list[str], cflags: list[str]) -> bool:
    """Whether load() finds a finished build of these sources with these flags (the build tag among
    them names the source digest, torch and options), so that it only imports it."""
    if build_dir is None or not glob.glob(os.path.join(build_dir, f"{JIT_NAME}*.so")):
        return False
    try:
        with open(os.path.join(build_dir, "build.ninja")) as f:
            ninja_file = f.read()
    except OSError:
        return False
    return all(item in ninja_file for item in sources + cflags)


def _jit_build():
    from torch.utils.cpp_extension import load

    root = _build.source_root()
    sources = _build.cpu_sources(root)
    if not os.path.exists(sources[0]):
        raise FileNotFoundError(f"no C++ sources to JIT-build from (looked for {sources[0]})")
    cflags = _build.cpu_cxx_flags() + _build.build_tag_flags(root, _build.cpu_build_options())
    build_dir = _jit_build_dir()
    if not _jit_cached(build_dir, sources, cflags):  # ~50 s on 2 cores: say so rather than hang silently
        where = f" (kept in {build_dir})" if build_dir else ""
        print(f"bregman_fused: building the C++ extension, about a minute, once{where}", file=sys.stderr, flush=True)
    return load(name=JIT_NAME, sources=sources, extra_include_paths=_build.include_dirs(root), extra_cflags=cflags,
                extra_ldflags=_build.cpu_link_flags(), verbose=os.environ.get("BREGMAN_FUSED_VERBOSE") == "1")


def _rebuild_hint() -> str:
    root = _build.source_root()
    if os.path.basename(root) == _build.PACKAGED_SOURCES:  # a regular install: the sources ship inside it
        return ("reinstall bregman_fused with the torch you have (`pip install --no-build-isolation --force-reinstall "
                "--no-deps <the sdist or checkout you installed it from>`)")
    return f"run `pip install --no-build-isolation -e .` in {root} again"


def _mismatch_reason(module_name: str) -> str | None:
    """Why the installed binary of ``module_name`` must not be imported: it was built from other
    sources than the csrc/ beside it, or for another torch than the one running ([note: build
    tag] in _build.py). Checked on the file, before importing (the import registers the ops for
    good). None when it fits, or when there is nothing to compare."""
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
    built = _build.built_tag(spec.origin)
    if built is None or built.source != current:
        return (f"{spec.origin} was built from other sources than {os.path.join(root, 'csrc')} (digest "
                f"{built.source if built else None}, sources {current}): csrc/ changed since the install; "
                f"{_rebuild_hint()}")
    running = _build.torch_version()
    if built.torch != running:
        was = f"torch {built.torch}" if built.torch else "a torch it does not record (a build from before that check)"
        return (f"{spec.origin} was built for {was}, but torch {running} is running, and a compiled extension works "
                f"only with the torch it was built against; {_rebuild_hint()}")
    return None


def _load_cpu() -> _LoadState:
    global _cpu
    if _cpu is not None:
        return _cpu
    with _lock:
        if _cpu is not None:
            return _cpu
        errors = []
        state = None
        stale = _mismatch_reason(_build.CPU_MODULE)
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
                except Exception as exc:  # the cause first: torch's message starts with ninja's command lines
                    errors.insert(0, f"JIT build failed: {_failure_cause(str(exc))}")
                    errors.append(f"the JIT build's whole message: {_describe(exc)}")
                else:
                    if stale is not None:
                        warnings.warn(f"bregman_fused: using a JIT build of the C++ extension, not the installed one: "
                                      f"{stale}", RuntimeWarning, stacklevel=2)
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
        stale = _mismatch_reason(_build.CUDA_MODULE)
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
