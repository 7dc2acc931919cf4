"""Sources and compiler flags of the compiled extensions, shared by setup.py and the JIT build.

Kept free of package imports: setup.py loads this file directly.
"""
from __future__ import annotations

import glob
import os

CPU_MODULE = "bregman_fused._C"
CUDA_MODULE = "bregman_fused._C_cuda"


def source_root() -> str:
    """The checkout that holds csrc/ (the package's parent folder in a source or editable install)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_sources(root: str) -> list[str]:
    return [os.path.join(root, "csrc", "ops.cpp")] + sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))


def cuda_sources(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))


def include_dirs(root: str) -> list[str]:
    return [os.path.join(root, "csrc")]


CXX_FLAGS = ["-O3", "-std=c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math"]


def _rel(root, paths):
    return [os.path.relpath(p, root) for p in paths]


def cpu_extension(root: str):
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(CPU_MODULE, _rel(root, cpu_sources(root)), include_dirs=include_dirs(root),
                        extra_compile_args={"cxx": CXX_FLAGS})


def cuda_extension(root: str):
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(CUDA_MODULE, _rel(root, cuda_sources(root)), include_dirs=include_dirs(root),
                         extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
