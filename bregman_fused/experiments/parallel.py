"""Process-group setup and model wrapping for ``torchrun`` (DDP, or FSDP2 with ``--fsdp``).

Under ``torchrun --nproc_per_node N -m bregman_fused.train`` the environment names the rank and
world size; ``setup`` joins the process group (gloo on CPU, nccl on GPU). Without torchrun it is a
no-op and everything runs in one process. Only rank 0 prints, shows progress bars and writes
files; every rank takes part in the collectives (FSDP forwards, ``opt.density()``/``evaluate_reg()``
on DTensor parameters, checkpoints).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Context", "setup", "teardown", "wrap", "all_reduce_sum", "barrier"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module created the process group (and so destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _device(name: str, local_rank: int) -> torch.device:
    if name in ("auto", "", None):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if dist.is_initialized() or "LOCAL_RANK" in os.environ else 0)
    return dev


def setup(device: str = "auto") -> Context:
    """Join the torchrun process group if there is one; pick the device (cuda when present)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local_rank)
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), dev, owns)
    return Context(0, 1, dev, False)


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context, fsdp: bool) -> nn.Module:
    """FSDP2 (``fully_shard`` on each Linear/Conv and the root) or DDP when the world has > 1 rank.

    FSDP2 shards every parameter on dim 0, so the optimizers' group maps stay exact per rank (see
    bregman_fused.distributed). Returns the module to call; optimizers take its ``.parameters()``.
    """
    if fsdp:
        if not ctx.distributed and not dist.is_initialized():
            raise ValueError("--fsdp needs a process group: run under torchrun (e.g. --nproc_per_node 2)")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # the mesh on the run's device: without one FSDP2 meshes the machine's accelerator, so a
        # `--device cpu` run on a GPU machine would move the shards to cuda:0 under a gloo group
        mesh = init_device_mesh(ctx.device.type, (dist.get_world_size(),))
        for m in model.modules():
            if isinstance(m, (nn.Linear, *_CONV)):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: list[float], ctx: Context) -> list[float]:
    """Sum a few floats over the ranks (float64); identity in one process."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.cpu().tolist()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
