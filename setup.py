"""Build script. The C++ CPU extension is built at install by default; the CUDA extension only when
asked for or when a CUDA toolkit and a GPU are both present.

Switches (environment):
  BREGMAN_FUSED_BUILD_CPU=0      skip the C++ CPU extension (it is JIT-built on first use instead)
  BREGMAN_FUSED_BUILD_CUDA=1|0   force / forbid the CUDA extension (default: toolkit found AND GPU visible)
  TORCH_CUDA_ARCH_LIST           CUDA archs to build for (e.g. "9.0"), as for any torch extension

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed
(otherwise pip first copies a multi-GB torch into a throw-away build environment). An extension
whose binary in bregman_fused/ was built from the same sources, for the same torch, with the same
options is not compiled again ([note: incremental build] below).
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_spec():
    """bregman_fused/_build.py (sources and flags, shared with the JIT build) without importing the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bregman_build", os.path.join(ROOT, "bregman_fused", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _switch(name: str, default: str) -> str:
    """An on/off build switch: "1", "0", or unset (default). Another value is refused, not read as
    on or off: BREGMAN_FUSED_BUILD_CPU=false used to build the extension all the same."""
    value = os.environ.get(name, default).strip()
    if value not in ("0", "1", ""):
        raise SystemExit(f"setup.py: {name}={value!r}: expected 1 (on) or 0 (off), or unset for the default")
    return value


def _want_cuda(cuda_home) -> bool:
    switch = _switch("BREGMAN_FUSED_BUILD_CUDA", "")
    if switch == "0":
        return False
    if switch == "1":
        return True
    import torch

    return cuda_home is not None and torch.cuda.is_available()


def extensions():
    build = _load_build_spec()
    if _switch("BREGMAN_FUSED_BUILD_CUDA", "") != "0" and not (os.environ.get("CUDA_HOME") or
                                                                     os.environ.get("CUDA_PATH")):
        # before torch.utils.cpp_extension reads it: torch's own guess fails for a wrapper nvcc
        # (_build.py [note: toolkit from nvcc])
        toolkit = build.nvcc_toolkit()
        if toolkit:
            os.environ["CUDA_HOME"] = toolkit
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError:  # no torch in the build environment: pure-Python install, JIT build on first use
        return [], {}
    cpu_extension, cuda_extension = build.cpu_extension, build.cuda_extension

    modules = []
    if _switch("BREGMAN_FUSED_BUILD_CPU", "1") != "0":
        modules.append(cpu_extension(ROOT))
    if _want_cuda(CUDA_HOME) and glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        modules.append(cuda_extension(ROOT))
    return modules, ({"build_ext": _skipping_current(BuildExtension.with_options(use_ninja=True), build)}
                     if modules else {})


def _skipping_current(build_ext_class, build):
    """build_ext that does not compile an extension whose binary in the package folder already is
    what this build would produce: the same build tag (csrc/ digest, torch version, options;
    _build.py [note: build tag]). [note: incremental build] pip's editable install builds in a new
    temporary folder every time, so `pip install --no-build-isolation -e .` recompiled everything
    (~80 s on 2 cores) even right after the same command had built it. Delete bregman_fused/_C*.so
    to force a build."""

    class BuildExtSkippingCurrent(build_ext_class):
        def build_extension(self, ext):
            in_package = os.path.join(ROOT, self.get_ext_filename(ext.name))
            if not build.binary_is_current(in_package, getattr(ext, "build_tag", None)):
                return super().build_extension(ext)
            print(f"bregman_fused: {os.path.relpath(in_package, ROOT)} was built from these sources for this torch "
                  "with these options: not rebuilt")
            target = self.get_ext_fullpath(ext.name)  # build_lib: the wheel, or the copy back for an editable install
            if os.path.abspath(target) != os.path.abspath(in_package):
                self.mkpath(os.path.dirname(target))
                self.copy_file(in_package, target)

    return BuildExtSkippingCurrent


class BuildPyWithSources(build_py):
    """Also ships csrc/ inside the package (bregman_fused/_src/csrc/...): a regular install has no
    checkout beside it, and the JIT fallback and the stale-build check read the sources from there.
    An editable install reads the checkout itself."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        build = _load_build_spec()
        for src in build.source_files(ROOT):
            dst = os.path.join(self.build_lib, "bregman_fused", build.PACKAGED_SOURCES, os.path.relpath(src, ROOT))
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst)


ext_modules, cmdclass = extensions()
cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

# Name, version (bregman_fused.__version__), dependencies, license and the rest of the metadata are
# in pyproject.toml; this file only adds what must run code: the compiled extensions.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
