"""Sources and compiler flags of the compiled extensions, shared by setup.py and the JIT build.

Kept free of package imports: setup.py loads this file directly.
"""
from __future__ import annotations

import glob
import os
import re
from typing import NamedTuple

CPU_MODULE = "bregman_fused._C"
CUDA_MODULE = "bregman_fused._C_cuda"


PACKAGED_SOURCES = "_src"  # bregman_fused/_src/csrc/...: the C++/CUDA sources shipped with the package


def source_root() -> str:
    """The folder that holds csrc/: the checkout (source or editable install), else the copy that
    setup.py ships inside the package (a regular install), so the JIT build works from both."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(package)
    if os.path.exists(os.path.join(checkout, "csrc", "ops.cpp")):
        return checkout
    packaged = os.path.join(package, PACKAGED_SOURCES)
    return packaged if os.path.exists(os.path.join(packaged, "csrc", "ops.cpp")) else checkout


SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def source_files(root: str) -> list[str]:
    """Every C++/CUDA source and header under root/csrc, sorted (what the build reads)."""
    out = []
    for folder, _, names in os.walk(os.path.join(root, "csrc")):
        out += [os.path.join(folder, n) for n in names if n.endswith(SOURCE_SUFFIXES)]
    return sorted(out)


def source_hash(root: str) -> str | None:
    """A short digest of csrc/ (paths and contents); None when there are no sources.
    [note: stale builds] Compiled into each extension ([note: build tag]) so that a module built
    from other sources than the ones next to it is noticed before it is imported."""
    import hashlib

    files = source_files(root)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return "h" + digest.hexdigest()[:16]


# [note: build tag] What a binary records about its build, so that a module that does not fit is
# noticed before it is imported (importing registers the ops, which cannot be undone):
#   h<digest of csrc/>t<torch.__version__ as hex>o<digest of the compile options>
# one identifier, passed as a bare -D token (BREGMAN_FUSED_SOURCE_HASH) and kept in the binary
# behind SOURCE_HASH_MARKER by csrc/module_init.h, which also exposes it as the module's
# `source_hash`. Hex keeps the '.' and '+' of a version like 2.14.1+cu130 away from the
# preprocessor and the shell; the separators h, t, o are not hex digits. The loader compares the
# sources and the torch version (a module is tied to the torch it was built against); setup.py
# also compares the options to skip a build whose result is already there.
SOURCE_HASH_MARKER = b"bregman_fused_source_hash:"


class BuildTag(NamedTuple):  # a NamedTuple: setup.py execs this file outside sys.modules, where dataclasses fail
    source: str  # "h" + digest of csrc/, as source_hash() returns it
    torch: str | None  # torch.__version__ at build time; None for a binary built before tags had it
    options: str | None  # digest of the compile options


_TAG = re.compile(r"(h[0-9a-f]+)(?:t([0-9a-f]+))?(?:o([0-9a-f]+))?")


def torch_version() -> str:
    import torch

    return torch.__version__


def options_digest(options: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\0".join(options).encode()).hexdigest()[:12]


def build_tag(root: str, options: list[str]) -> str | None:
    """The tag compiled into a binary built now from root/csrc with these options; None without sources."""
    digest = source_hash(root)
    if digest is None:
        return None
    return f"{digest}t{torch_version().encode().hex()}o{options_digest(options)}"


def parse_tag(text: str | None) -> BuildTag | None:
    match = _TAG.fullmatch(text or "")
    if match is None:
        return None
    torch_hex = match.group(2)
    try:
        version = bytes.fromhex(torch_hex).decode() if torch_hex else None
    except ValueError:  # odd length or not UTF-8: not a version this file wrote
        version = None
    return BuildTag(match.group(1), version, match.group(3))


def build_tag_flags(root: str, options: list[str]) -> list[str]:
    tag = build_tag(root, options)
    return [f"-DBREGMAN_FUSED_SOURCE_HASH={tag}"] if tag else []


def built_tag(module_file: str) -> BuildTag | None:
    """The tag compiled into an extension binary, read from the file without importing it; None
    for a binary without one."""
    try:
        with open(module_file, "rb") as f:
            data = f.read()
    except OSError:
        return None
    at = data.find(SOURCE_HASH_MARKER)
    while at >= 0:  # the first marker followed by a tag (the bare marker may be in the file too)
        start = end = at + len(SOURCE_HASH_MARKER)
        while end < len(data) and end - start < 256 and chr(data[end]).isalnum():
            end += 1
        tag = parse_tag(data[start:end].decode())
        if tag is not None:
            return tag
        at = data.find(SOURCE_HASH_MARKER, end)
    return None


def binary_is_current(module_file: str, tag: str | None) -> bool:
    """Whether the binary at module_file carries this tag: the same sources, torch and options, so a
    build now would produce it again (setup.py [note: incremental build])."""
    wanted = parse_tag(tag)
    return wanted is not None and wanted.torch is not None and built_tag(module_file) == wanted


def built_source_hash(module_file: str) -> str | None:
    """The digest of the csrc/ an extension binary was built from (see built_tag)."""
    tag = built_tag(module_file)
    return tag.source if tag else None


def cpu_sources(root: str) -> list[str]:
    return [os.path.join(root, "csrc", "ops.cpp")] + sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))


def cuda_sources(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))


def include_dirs(root: str) -> list[str]:
    return [os.path.join(root, "csrc")]


def nvcc_toolkit() -> str | None:
    """The CUDA toolkit folder that the ``nvcc`` on PATH belongs to, or None without one.

    [note: toolkit from nvcc] torch guesses CUDA_HOME as the folder above ``which nvcc``, which is
    wrong when nvcc is a wrapper script (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc):
    the headers are then not found. nvcc's own dry run names its toolkit (TOP=<toolkit>/bin/..)."""
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "probe.cu"), "w").close()
        try:
            out = subprocess.run([nvcc, "-dryrun", "-c", "probe.cu", "-o", "probe.o"], cwd=tmp, capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line[len("#$ TOP="):].strip())
            return top if os.path.isfile(os.path.join(top, "bin", "nvcc")) else None
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def pip_cuda_include_dirs() -> list[str]:
    """The header folders of pip's CUDA packages beside torch (nvidia/cu13/include holds cusparse.h,
    cublas_v2.h, ...). [note: pip CUDA headers] A pip-installed CUDA torch includes those headers
    (ATen/cuda/CUDAContextLight.h needs cusparse.h), but a CUDA toolkit installed without its
    libraries' development headers does not have them: the build then fails unless these folders
    are on the include path. Empty when torch or the packages are not there."""
    try:
        import torch
    except ImportError:
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def cxx_std_flag() -> str:
    """The C++ standard torch's own extension builder uses for the installed torch: C++20 where
    its headers demand it (torch >= 2.10: std::strong_ordering, string_view::starts_with), else
    C++17, the standard libtorch itself was built with (e.g. torch 2.11)."""
    try:
        import torch
    except ImportError:  # no torch at build time: no extension is built anyway
        return "-std=c++20"
    aten_h = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten_h) as f:
            return "-std=c++20" if "C++20 or later" in f.read() else "-std=c++17"
    except OSError:
        return "-std=c++20"


CXX_FLAGS = ["-O3", cxx_std_flag()]
# [note: cpu arch flags] The CPU kernels are written with at::vec::Vectorized, whose SIMD
# specializations only exist when a capability macro is defined: CPU_CAPABILITY_AVX512 (512-bit,
# 16 float lanes) or CPU_CAPABILITY_AVX2 (256-bit, 8 lanes). libtorch compiles its own kernels once
# per capability and dispatches at run time; an extension gets the portable scalar-array fallback
# without one, several times slower. The extension is compiled on the machine that runs it (pip
# install from source, or the JIT build on first use), so the build picks the widest capability
# that CPU has: AVX-512 (the flags ATen compiles its AVX512 kernels with, plus F16C) where
# avx512f/bw/vl/dq are there, else AVX2/FMA/F16C. The compact-moment steps are compute-bound
# (square roots, divisions, the codes' hash and narrowing), where 512-bit vectors do twice the
# elements per instruction. Both builds store bit-identical results, NaNs included (the same
# operations per element, csrc/cpu/moment_memory.h; SIMD min/max and stores with the scalar tail's
# bits, as the tails start at other elements; reductions in a width-independent order,
# csrc/cpu/row_maps.h [note: width-independent sums]; tests/test_cpu_isa.py compares the two).
# -ffp-contract=off: no FMA contraction, so the SIMD body and the scalar tail (the same templates
# from bregman_math.h) round identically.
# BREGMAN_FUSED_CPU_ARCH overrides the detection: "avx512" or "avx2" (force that capability, e.g.
# cross-building for a known fleet, or AVX2 on an AVX-512 machine to compare), "native"
# (-march=native with the capability of this CPU), "default" (portable: no ISA flags, e.g. for a
# wheel that runs elsewhere). The flags are part of the build tag's options ([note: build tag]),
# so changing the mode rebuilds.
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"]
_AVX2_CPU = {"avx2", "fma", "f16c"}
_AVX512_CPU = _AVX2_CPU | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def _cpu_flags() -> set[str]:
    """The ISA flags /proc/cpuinfo lists for this CPU; empty elsewhere (not x86-64, no /proc)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_has_avx2() -> bool:
    return _AVX2_CPU <= _cpu_flags()


def _cpu_has_avx512() -> bool:
    return _AVX512_CPU <= _cpu_flags()


def cpu_arch_flags() -> list[str]:
    mode = os.environ.get("BREGMAN_FUSED_CPU_ARCH", "auto").strip().lower()
    if mode == "default":
        return []
    if mode == "native":
        capability = ("-DCPU_CAPABILITY_AVX512" if _cpu_has_avx512() else
                      "-DCPU_CAPABILITY_AVX2" if _cpu_has_avx2() else None)
        return ["-march=native"] + ([capability] if capability else [])
    if mode == "avx512" or (mode in ("auto", "") and _cpu_has_avx512()):
        return list(AVX512_FLAGS)
    if mode == "avx2" or (mode in ("auto", "") and _cpu_has_avx2()):
        return list(AVX2_FLAGS)
    if mode not in ("auto", ""):
        raise ValueError(f"BREGMAN_FUSED_CPU_ARCH={mode!r}: expected auto, avx512, avx2, native or default")
    return []


def cpu_isa(flags: list[str]) -> str:
    """The at::vec capability a CPU build with these flags compiles: "avx512", "avx2" or "default"
    (what the compiled module reports as ``cpu_isa``, csrc/ops.cpp)."""
    for isa in ("avx512", "avx2"):
        if f"-DCPU_CAPABILITY_{isa.upper()}" in flags:
            return isa
    return "default"


# at::parallel_for is an inline template: in a libtorch built with OpenMP (AT_PARALLEL_OPENMP, the
# Linux wheels) its `#pragma omp parallel` is compiled into OUR object, so without -fopenmp the
# kernels silently run on one thread. The extension then links libgomp.so.1, which resolves to the
# copy libtorch already loaded (same soname): one OpenMP runtime, one thread pool.
OPENMP_FLAGS = ["-fopenmp"]


def cpu_cxx_flags() -> list[str]:
    return CXX_FLAGS + ["-ffp-contract=off", "-Wno-unknown-pragmas"] + OPENMP_FLAGS + cpu_arch_flags()


def cpu_link_flags() -> list[str]:
    return list(OPENMP_FLAGS)


def _compiler_env(*names: str) -> list[str]:
    return [f"{name}={os.environ.get(name, '')}" for name in ("CC", "CXX") + names]


def cpu_build_options() -> list[str]:
    """What decides the CPU binary besides the sources and torch (the o part of its build tag)."""
    return cpu_cxx_flags() + cpu_link_flags() + _compiler_env()


# No --use_fast_math: it would turn the shared header's divides and sqrt into approximations, flush
# subnormals and contract into FMAs, so CUDA would round differently from the reference and the CPU
# kernels (a one-ulp change flips θ between zero and non-zero at the threshold). The kernels are
# memory-bound: exact IEEE math costs nothing measurable. --fmad=false for the same reason as the
# CPU build's -ffp-contract=off.
NVCC_FLAGS = ["-O3", cxx_std_flag(), "--fmad=false"]


def cuda_build_options() -> list[str]:
    """What decides the CUDA binary besides the sources and torch (the o part of its build tag)."""
    return CXX_FLAGS + NVCC_FLAGS + pip_cuda_include_dirs() + _compiler_env("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")


def _rel(root, paths):
    return [os.path.relpath(p, root) for p in paths]


# Each Extension carries the tag it will compile in (build_tag), so that setup.py can see whether the
# binary already in the package is exactly what the build would produce.


def cpu_extension(root: str):
    from torch.utils.cpp_extension import CppExtension

    options = cpu_build_options()
    ext = CppExtension(CPU_MODULE, _rel(root, cpu_sources(root)), include_dirs=include_dirs(root),
                       extra_compile_args={"cxx": cpu_cxx_flags() + build_tag_flags(root, options)},
                       extra_link_args=cpu_link_flags())
    ext.build_tag = build_tag(root, options)
    return ext


def cuda_extension(root: str):
    from torch.utils.cpp_extension import CUDAExtension

    options = cuda_build_options()
    tag_flags = build_tag_flags(root, options)
    ext = CUDAExtension(CUDA_MODULE, _rel(root, cuda_sources(root)),
                        include_dirs=include_dirs(root) + pip_cuda_include_dirs(),
                        extra_compile_args={"cxx": CXX_FLAGS + tag_flags, "nvcc": NVCC_FLAGS + tag_flags})
    ext.build_tag = build_tag(root, options)
    return ext
