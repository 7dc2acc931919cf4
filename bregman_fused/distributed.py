"""DTensor (FSDP2) support: the optimizers update local shards; metrics are summed over ranks.

Every backend works on plain local tensors. With FSDP2 (``fully_shard``) a parameter is a DTensor
sharded on dim 0, so its local shard holds whole rows of ``θ.flatten(1)`` and whole conv kernels:
the group proximal maps stay exact without any communication [note: row-preserving shards]. A
layout that would split a group (e.g. ``Shard(1)`` with ``GroupL1L2``) is refused with an error
instead of silently computing per-shard norms. Optimizer states of a DTensor parameter are
DTensors with the parameter's placements, so ``torch.distributed.checkpoint`` can reshard them to
another world size.
"""
from __future__ import annotations

import math

import torch

from .backends.contract import RegCode
from .backends.layout import leading_dims
from .regularizers import Regularizer

try:
    from torch.distributed.tensor import DTensor, Shard
except Exception:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment]
    Shard = None  # type: ignore[assignment]


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel updates in place: the local shard of a DTensor, else t itself."""
    return t._local_tensor if is_dtensor(t) else t


def like_param(local_value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap a state computed on param's local shard as a DTensor laid out like param."""
    if not is_dtensor(param):
        return local_value
    return DTensor.from_local(local_value, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def rows_whole_on_shards(param: torch.Tensor) -> bool:
    """Every dim-0 row of param lies on one rank: not a DTensor, or sharded on dim 0 only."""
    if not is_dtensor(param):
        return True
    return all(not isinstance(pl, Shard) or pl.dim == 0 for pl in param.placements)


def like_rows(local_rows: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap per-row values of param's local shard (shape (local rows, k)) as a DTensor sharded like
    param's dim 0 (8-bit moment scales, backends/moments.py); a plain tensor for plain params."""
    if not is_dtensor(param):
        return local_rows
    shape = (param.shape[0], local_rows.shape[1])
    return DTensor.from_local(local_rows, param.device_mesh, param.placements, run_check=False, shape=shape,
                              stride=(shape[1], 1))


def check_sharding(param: torch.Tensor, reg: Regularizer) -> None:
    """Raise ValueError if param's sharding would split one of reg's groups across ranks."""
    if not is_dtensor(param):
        return
    code = RegCode.of(reg.kind)
    if code is None:
        raise ValueError("Nuclear needs the whole matrix for its SVD; it does not support sharded (DTensor) parameters")
    if not code.is_row_map:
        return  # element-wise maps are exact on any shard
    # rows are θ.flatten(1) (GroupL1L2) or the kernels θ.flatten(2) (KernelL1L2): sharding one of
    # the leading dims in front of a row keeps every group on one rank
    lead_dims = leading_dims(param.shape, reg.group_size(param.shape))
    for placement in param.placements:
        if isinstance(placement, Shard) and placement.dim >= lead_dims:
            raise ValueError(
                f"{type(reg).__name__} couples whole rows, but a parameter of shape {list(param.shape)} is sharded "
                f"on dim {placement.dim}, which splits them across ranks; shard on dim 0 (FSDP2's default) instead"
            )


def shard_fraction(param: torch.Tensor) -> float:
    """How much of a global sum one rank's local value contributes once summed over all ranks.

    A sharded dim splits the tensor; a replicated mesh dim holds the same values on several ranks,
    which an all-reduce over the world would count several times.
    """
    if not is_dtensor(param):
        return 1.0 / _world_size()  # a plain (e.g. DDP-replicated) tensor: every rank holds it all
    mesh = param.device_mesh
    shards = math.prod(mesh.size(i) for i, pl in enumerate(param.placements) if isinstance(pl, Shard))
    return shards / _world_size()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(parts: list[tuple[float, torch.Tensor]]) -> float:
    """Σ value over (value, param) pairs where each value is this rank's local part of param.

    A collective (every rank must call it) when any param is a DTensor; plain tensors are taken to
    be replicas (DDP), which need no communication.
    """
    if not any(is_dtensor(p) for _, p in parts):
        return float(sum(v for v, _ in parts))
    return all_reduce_sum([sum(v * shard_fraction(p) for v, p in parts)])[0]


def all_reduce_sum(local_parts: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64, one collective); identity without a process group."""
    if _world_size() == 1:
        return local_parts
    t = torch.tensor(local_parts, dtype=torch.float64)
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()
