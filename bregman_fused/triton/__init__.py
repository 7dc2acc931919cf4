"""Triton backend. Placeholder until the Triton kernels land (issue 4)."""
from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return "the Triton backend is not part of this build yet"
