"""Loads the compiled C++/CUDA ops. Placeholder until the fused CPU backend lands (issue 3)."""
from __future__ import annotations


def cpu_available() -> bool:
    return False


def cpu_error() -> str:
    return "the C++ extension is not part of this build yet"


def cuda_available() -> bool:
    return False


def cuda_error() -> str:
    return "the CUDA extension is not part of this build yet"
