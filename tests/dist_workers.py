"""Worker functions for tests/test_distributed.py (spawned processes import them by name)."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import bregman_fused as bf

GLOBAL_BATCH = 8
STEPS = 4


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # odd sizes: FSDP2 shards them unevenly over 2 ranks
    m = torch.nn.Sequential(
        torch.nn.Conv2d(1, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(5 * 4 * 4, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3),
    )
    with torch.no_grad():  # a sparse start, as in the paper: zero kernels, rows and entries
        m[0].weight[torch.rand(5, 1) < 0.5] = 0
        m[3].weight[torch.rand(7) < 0.5] = 0
        m[3].weight[torch.rand(7, 80) < 0.5] = 0
    return m


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
            for _ in range(n)]


def optimizer(m: torch.nn.Module, name: str, reg: str, backend: str):
    regs = {"l1": lambda: bf.L1(0.02), "group": lambda: bf.GroupL1L2(0.02)}
    conv_reg = bf.KernelL1L2(0.02) if reg == "group" else bf.L1(0.02)
    groups = [
        {"params": [m[0].weight], "reg": conv_reg},
        {"params": [m[3].weight, m[5].weight], "reg": regs[reg]()},
        {"params": [m[0].bias, m[3].bias, m[5].bias]},
    ]
    if name == "linbreg":
        return bf.LinBreg(groups, lr=0.1, momentum=0.5, backend=backend)
    return bf.AdaBreg(groups, lr=1e-2, backend=backend)


def train(m, opt, data, rank: int = 0, world: int = 1):
    for x, y in data:
        per_rank = GLOBAL_BATCH // world
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()


def full_params(m) -> list[torch.Tensor]:
    out = []
    for p in m.parameters():
        p = p.detach()
        out.append(p.full_tensor() if hasattr(p, "full_tensor") else p.clone())
    return out


def _init(rank: int, world: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _finish():
    """Ranks tear down together: the gloo group is destroyed only once both ranks are done."""
    dist.barrier()


def exit_now():
    """End a worker that finished cleanly without the interpreter's shutdown. Before this, about one
    run of this file in 12 had an FSDP2 worker abort with "terminate called without an active
    exception" (a C++ std::thread destroyed while joinable) after its work and the barrier; with
    os._exit, 0 aborts in 20 runs. A worker that raised never gets here: its exception still
    reaches the parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, init_file: str, out_dir: str, combos: list, run_one) -> None:
    """The life of one worker: join the group, ``run_one(a, b)`` for every combo (rank 0 saves the
    results by "a-b"), tear down together, and end without the interpreter's shutdown."""
    _init(rank, world, init_file)
    try:
        results = {f"{a}-{b}": run_one(a, b) for a, b in combos}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        _finish()
    finally:
        dist.destroy_process_group()
    exit_now()


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str, combos: list, backend: str):
    def run_one(name, reg):
        m = torch.nn.parallel.DistributedDataParallel(model())
        opt = optimizer(m.module, name, reg, backend)
        train(m, opt, batches(), rank, world)
        return {"params": full_params(m.module), "density": opt.density()}

    _worker(rank, world, init_file, out_dir, combos, run_one)


def _shard(m):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # a CPU mesh: without one FSDP2 would mesh the GPU of a GPU machine under this gloo group
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in m:
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def fsdp_worker(rank: int, world: int, init_file: str, out_dir: str, combos: list, backend: str,
                checkpoint_after: int = -1):
    _worker(rank, world, init_file, out_dir, combos,
            lambda name, reg: _fsdp_run(rank, world, out_dir, name, reg, backend, checkpoint_after))


def _fsdp_run(rank, world, out_dir, name, reg, backend, checkpoint_after):
        m = _shard(model())
        opt = optimizer(m, name, reg, backend)
        data = batches()
        if checkpoint_after >= 0:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            train(m, opt, data[:checkpoint_after], rank, world)
            model_sd, optim_sd = get_state_dict(m, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, "ckpt"))
            data = data[checkpoint_after:]
        train(m, opt, data, rank, world)
        density, reg_values = opt.density(), opt.evaluate_reg()  # collectives: every rank calls them
        return {"params": full_params(m), "density": density, "reg": reg_values}


def moments_model(seed: int = 0) -> torch.nn.Module:
    """Layers big enough for 8-bit moments (≥ 4096 elements), with rows of one block (36) and of two
    (300: 256 + 44), and odd row counts that FSDP2 shards unevenly (301 → 151 + 150, 17 → 9 + 8)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 301), torch.nn.ReLU(),
                               torch.nn.Linear(301, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3))


def moments_optimizer(m: torch.nn.Module, name: str, moments: str, backend: str):
    weights = [m[1].weight, m[3].weight, m[5].weight]
    groups = [{"params": weights, "reg": bf.L1(0.02)}, {"params": [m[1].bias, m[3].bias, m[5].bias]}]
    if name == "linbreg":
        return bf.LinBreg(groups, lr=0.1, momentum=0.5, moments=moments, backend=backend)
    return bf.AdaBreg(groups, lr=1e-2, moments=moments, backend=backend)


def fsdp_moments_worker(rank: int, world: int, init_file: str, out_dir: str, combos: list, backend: str):
    """Compact moments on FSDP2 shards: the params and the stored moments (codes and scales)."""
    def run_one(name, fmt):
        m = _shard(moments_model())
        opt = moments_optimizer(m, name, fmt, backend)
        train(m, opt, batches(), rank, world)
        states = {f"{i}.{k}": (t.full_tensor() if hasattr(t, "full_tensor") else t.clone())
                  for i, w in enumerate([m[1].weight, m[3].weight]) for k, t in opt.state[w].items()}
        return {"params": full_params(m), "states": states}

    _worker(rank, world, init_file, out_dir, combos, run_one)


def fsdp_moments_reload_worker(rank: int, world: int, init_file: str, out_dir: str, combos: list, backend: str):
    """Sharded states through opt.state_dict() / load_state_dict() (the path of
    torch.distributed.checkpoint's set_state_dict): saved in format ``src``, loaded into an optimizer
    of format ``dst``; both then take the remaining steps. Returns the params of both runs."""
    def run_one(name, formats):
        src, dst = formats.split(">")
        data = batches()
        m = _shard(moments_model())
        opt = moments_optimizer(m, name, src, backend)
        train(m, opt, data[:2], rank, world)
        m2 = _shard(moments_model(seed=5))
        m2.load_state_dict(m.state_dict())
        opt2 = moments_optimizer(m2, name, dst, backend)
        opt2.load_state_dict(opt.state_dict())
        train(m, opt, data[2:], rank, world)
        train(m2, opt2, data[2:], rank, world)
        fmt_of = {k: str(v.dtype) for k, v in opt2.state[m2[3].weight].items()}
        return {"params": full_params(m), "reloaded": full_params(m2), "state_dtypes": fmt_of}

    _worker(rank, world, init_file, out_dir, combos, run_one)


def resume_single_process(ckpt_dir: str, name: str, reg: str, backend: str, checkpoint_after: int):
    """Load a checkpoint written by 2 FSDP2 ranks into an unsharded model in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    m = model(seed=99)  # different init: everything must come from the checkpoint
    opt = optimizer(m, name, reg, backend)
    model_sd, optim_sd = get_state_dict(m, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(ckpt_dir, "ckpt"))
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(m, opt, batches()[checkpoint_after:])
    return full_params(m), opt


def few_rows_model(seed: int = 0) -> torch.nn.Module:
    """moments_model with a last layer of one row of 4096 inputs (8-bit moments): on 2 ranks, rank 1's
    shard of its weight holds 0 rows."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 4096), torch.nn.ReLU(),
                               torch.nn.Linear(4096, 1), torch.nn.Linear(1, 3))


def fsdp_few_rows_worker(rank: int, world: int, init_file: str, out_dir: str, combos: list, backend: str):
    """8-bit moments with an empty shard, and the λ scheduler's density: the same on every rank."""
    def run_one(name, fmt):
        m = _shard(few_rows_model())
        opt = bf.AdaBreg([{"params": [m[1].weight, m[3].weight], "reg": bf.L1(0.5)},
                          {"params": [m[1].bias, m[3].bias, m[4].weight, m[4].bias]}], lr=1e-2, moments=fmt, backend=backend)
        train(m, opt, batches(), rank, world)
        sched = bf.LamdaScheduler(opt, 0, target_density=0.01)
        density = sched.group_density()  # a collective: every rank calls it
        sched.step(density)
        lamdas = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(lamdas, torch.tensor(sched.lamda))
        return {"params": full_params(m), "density": density, "lamdas": torch.stack(lamdas)}

    _worker(rank, world, init_file, out_dir, combos, run_one)
