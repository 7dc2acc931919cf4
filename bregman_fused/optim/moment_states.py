"""The moment states of a param in the format its group asks for (``moments=``, backends/moments.py).

A moment ``key`` ("exp_avg", "exp_avg_sq", "momentum_buffer") is stored in ``state[key]``; an
8-bit one also has its block scales in ``state[key + "_scale"]``. They are made (zeros) at a
param's first step, and converted (rounded to nearest) when the format they are stored in is not
the one the group asks for: after ``group["moments"]`` was changed, or a checkpoint of another
format was loaded. A conversion to a coarser format loses what that format cannot hold; fp32 →
bf16 → fp32 is not the identity.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import distributed as dist_utils
from ..backends import moments
from ..backends.contract import state_dtype
from ..backends.layout import in_layout_of

__all__ = ["SCALE_SUFFIX", "target_format", "ensure", "restore", "check_stored", "is_signed"]

SCALE_SUFFIX = "_scale"
_UNSIGNED = {"exp_avg_sq"}  # s ≥ 0, coded by √s; every other moment is signed


def is_signed(key: str) -> bool:
    return key not in _UNSIGNED


def target_format(p: torch.Tensor, group: dict[str, Any]) -> str:
    """The format of p's moments in ``group``: moments.storage, and fp32 for a DTensor sharded on
    another dim than 0 (8-bit blocks follow dim-0 rows, which a shard must keep whole)."""
    fmt = moments.storage(p, group.get("moments", "fp32"))
    if fmt == "8bit" and not dist_utils.rows_whole_on_shards(p):
        return "fp32"
    return fmt


def _make(value: torch.Tensor, scale: torch.Tensor | None, p: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Stored moment (and scale) from local float32 values, wrapped like p (DTensor or layout)."""
    if fmt == "8bit":
        return {"": dist_utils.like_param(value, p), SCALE_SUFFIX: dist_utils.like_rows(scale, p)}
    return {"": dist_utils.like_param(in_layout_of(value, dist_utils.local(p)), p)}


def ensure(state: dict[str, Any], key: str, p: torch.Tensor, fmt: str) -> None:
    """state[key] (and its scale) in format ``fmt``: zeros when missing, converted when stored in
    another format, untouched when already right."""
    local_p = dist_utils.local(p)
    if key in state:
        stored = dist_utils.local(state[key])
        if moments.format_of(stored) == fmt:
            return
        scale = state.get(key + SCALE_SUFFIX)
        value = moments.to_float(stored, dist_utils.local(scale) if scale is not None else None, is_signed(key))
    else:
        value = torch.zeros(local_p.shape, dtype=torch.float32, device=local_p.device)
    if fmt == "fp32":
        value = value.to(state_dtype(local_p))
    new, scale = moments.to_storage(value, fmt, is_signed(key))
    for suffix, t in _make(new, scale, p, fmt).items():
        state[key + suffix] = t
    if fmt != "8bit":
        state.pop(key + SCALE_SUFFIX, None)


def restore(state: dict[str, Any], saved: dict[str, Any], key: str, p: torch.Tensor, fmt: str) -> None:
    """Load moment ``key`` of a checkpoint's state into ``state`` in format ``fmt``: bit for bit when
    the checkpoint has that format, converted otherwise."""
    stored, scale = saved[key], saved.get(key + SCALE_SUFFIX)
    local_p = dist_utils.local(p)
    same = moments.format_of(dist_utils.local(stored)) == fmt
    if same and (dist_utils.is_dtensor(stored) or dist_utils.is_dtensor(p)):
        # a sharded checkpoint (torch.distributed.checkpoint lays it out like the param): kept as is
        dtype = stored.dtype if fmt != "fp32" else state_dtype(local_p)
        state[key] = stored.to(dtype=dtype).clone()
        if fmt == "8bit":
            state[key + SCALE_SUFFIX] = scale.clone()
        return
    if same:
        if fmt == "8bit":
            state[key] = dist_utils.like_param(stored.to(local_p.device).contiguous().clone(), p)
            state[key + SCALE_SUFFIX] = dist_utils.like_rows(scale.to(local_p.device, torch.float32).contiguous().clone(), p)
        else:
            dtype = torch.bfloat16 if fmt == "bf16" else state_dtype(local_p)
            state[key] = dist_utils.like_param(in_layout_of(stored.to(local_p.device, dtype), local_p), p)
        return
    state[key] = dist_utils.local(stored).to(local_p.device)
    if scale is not None:
        state[key + SCALE_SUFFIX] = dist_utils.local(scale).to(local_p.device)
    ensure(state, key, p, fmt)


def check_stored(key: str, value: Any, scale: Any, shape) -> str | None:
    """What is wrong with a stored moment (any format) and its scale for a param of ``shape``;
    None when it fits."""
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                                                    torch.float16, torch.int8, torch.uint8):
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        return f"state {key!r} is {got}; expected a float tensor or 8-bit codes"
    if value.shape != shape:
        return f"state {key!r} has shape {tuple(value.shape)}, but its param has shape {tuple(shape)}"
    if moments.format_of(value) == "8bit" and len(shape) == 0:
        return f"state {key!r} holds 8-bit codes, but its param has no dims (8-bit blocks follow dim-0 rows)"
    if moments.format_of(value) == "8bit":
        want = torch.int8 if is_signed(key) else torch.uint8
        if value.dtype != want:
            return f"8-bit state {key!r} must be {want} codes, got {value.dtype}"
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != moments.scale_shape(shape):
            got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
            return (f"8-bit state {key!r} needs its block scales {key + SCALE_SUFFIX!r} of shape "
                    f"{moments.scale_shape(shape)}, got {got}")
    elif scale is not None:
        return f"state {key + SCALE_SUFFIX!r} belongs to 8-bit codes, but {key!r} is {value.dtype}"
    return None
