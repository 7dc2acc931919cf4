"""Helpers for the CUDA-graph tests (GPU only; every caller skips without one)."""
from __future__ import annotations

from typing import Callable

import torch


def warm_up_on_side_stream(step: Callable[[int], object], n: int) -> None:
    """Run step(0) … step(n − 1) on a side stream, as torch.cuda.graph asks of the warm-up before a
    capture (lazy allocations and cuBLAS workspaces happen there, not in the captured stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(n):
            step(k)
    torch.cuda.current_stream().wait_stream(side)
