"""Checks of single argument values, shared by the optimizer classes (optim/checks.py), the
functional API (backends/contract.Hyper.check) and checkpoint loading. Each error names the
argument and says what it must be."""
from __future__ import annotations

import math
from typing import Any

import torch


def finite(name: str, value: Any) -> float:
    """``value`` as a float: anything ``float()`` takes (a Python/numpy number, a one-element tensor
    or array) except strings and bools, finite. A string is refused: float("0.5") would pass here
    and fail in a backend's arithmetic."""
    if type(value) is not float:  # the common case, checked in a step's hot path, skips the rest
        if isinstance(value, (str, bytes, bool)):
            raise ValueError(f"Invalid {name}: {value!r} (must be a number, not a {type(value).__name__})")
        try:
            value = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"Invalid {name}: {value!r} (must be a number)") from None
    # not math.isfinite: under torch.compile a float that changed between steps is a SymFloat, which
    # math.isfinite does not take; x − x is 0 for a finite x, NaN for ±inf and NaN
    if not value - value == 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    return value


def in_unit_interval(name: str, value: Any) -> None:
    if not 0.0 <= finite(name, value) < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def at_least_zero(name: str, value: Any) -> None:
    if finite(name, value) < 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")


def positive(name: str, value: Any) -> None:
    if not finite(name, value) > 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")


def check_lr_value(lr: Any) -> None:
    """A finite lr >= 0; reads a tensor lr (a host sync for a device tensor: call it where a value
    is set, not per step)."""
    at_least_zero("lr", lr)


def check_lr_tensor(lr: torch.Tensor) -> None:
    """What a tensor lr must be without reading it: one float32/float64 value."""
    if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Invalid lr: a tensor lr must hold one float32/float64 value, got {lr.dtype} "
                         f"with {lr.numel()} elements")


def check_step_count(name: str, value: Any) -> None:
    """A saved step count: one whole number >= 0 (bias corrections and bf16's random bits use it)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"Invalid {name}: a tensor of {value.numel()} elements (must hold one step count)")
    count = finite(name, value)
    if count < 0.0 or count != math.floor(count):
        raise ValueError(f"Invalid {name}: {count} (must be a whole number >= 0)")
