"""Memory of an optimizer's states: bytes per parameter element, for any torch optimizer."""
from __future__ import annotations

import torch

from . import distributed as dist_utils

__all__ = ["state_bytes"]


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The bytes of every tensor in ``optimizer.state`` (this rank's shards for DTensors), the number
    of parameter elements of its groups, and their ratio:
    ``{"bytes": B, "params": N, "per_param": B / N}``.

    For AdaBreg with fp32 params the ratio is 12 (dual, m, s in float32) with ``moments="fp32"``,
    8 with ``"bf16"`` (torch's Adam: 8), and 4 + 2·(1 + 4·⌈L/256⌉/L) per element of the 8-bit params
    with ``"8bit"``, L their dim-0 row length (one float32 scale per 256-element block of each row of
    each of m and s: ≈ 6.03 for L a multiple of 256), plus 12 for the params that keep fp32 moments
    (backends/moments.py). Step counters add 4 bytes per tensor. Tensors
    held in lists, tuples or dicts of a state (LBFGS's history) count too, each storage once."""
    storages: dict[tuple, int] = {}
    total = 0
    for state in optimizer.state.values():
        for value in _tensors(state):
            local = dist_utils.local(value)
            if local.device.type == "meta":  # no memory to share: what the tensor would take
                total += local.numel() * local.element_size()
            elif local.numel():  # a view shares its base's memory: counted by storage, once
                storage = local.untyped_storage()
                storages[(local.device, storage.data_ptr())] = storage.nbytes()
    total += sum(storages.values())
    n = sum(dist_utils.local(p).numel() for g in optimizer.param_groups for p in g["params"])
    return {"bytes": float(total), "params": float(n), "per_param": total / n if n else 0.0}


def _tensors(value):
    """The tensors in a state value, through lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
