"""The training loop: build everything from a resolved configuration, train, log, checkpoint.

``run(cfg, ctx)`` trains one optimizer and returns its history (one dict per epoch):

    epoch, train_loss, train_acc (running over the epoch's batches), val_loss, val_acc, test_loss,
    test_acc (NaN for the autoencoder), density (all Linear+Conv weights), linear_density,
    conv_kernel_density (NaN without convs), node_density, reg (J(θ) summed over the groups),
    reg_<group> (J per group: linear, conv, skips), lamda (of the first regularized group), lr, seconds

Reproducibility: the seed fixes the init, the data order (DistributedSampler's permutation of
(seed, epoch) [note: data order]) and every other random draw; a checkpoint stores all RNG states,
so ``--resume`` continues bit for bit.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from ..init import sparsify_
from ..optim import AdaBreg, LinBreg, ProxSGD
from ..regularizers import L1, GroupL1L2, KernelL1L2, NoReg
from ..schedulers import LamdaScheduler
from . import checkpoint as ckpt
from . import data as data_mod
from . import history as hist_mod
from .init_plan import layer_inits
from .models import build_model, input_size
from .parallel import Context, all_reduce_sum, unwrap, wrap
from .sparsity import sparsity_stats

__all__ = ["build_optimizer", "init_weights", "run", "evaluate"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# -- model and optimizer --------------------------------------------------------------------------
def _param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{linear, conv, skips, other}: Linear weights, Conv weights, skip weights, everything else."""
    groups: dict[str, list[nn.Parameter]] = {"linear": [], "conv": [], "skips": [], "other": []}
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if name == "weight" and isinstance(m, nn.Linear):
                groups["linear"].append(p)
            elif name == "weight" and isinstance(m, _CONV):
                groups["conv"].append(p)
            elif name == "skips":
                groups["skips"].append(p)
            else:
                groups["other"].append(p)
    return groups


def _reg(kind: str, lamda: float):
    if kind == "none":
        return NoReg()
    return {"l1": L1, "group": GroupL1L2, "kernel": KernelL1L2}[kind](lamda)


def build_optimizer(model: nn.Module, cfg: dict[str, Any], backend: str = "auto") -> torch.optim.Optimizer:
    """Param groups (each with a "name"): linear (``linear_reg``), conv (``conv_reg``), skips (L1),
    other (unregularized). "sgd"/"adam" = LinBreg/AdaBreg with no regularizer on one group."""
    optim, lr = cfg["optim"], cfg["lr"]
    moments = cfg.get("moments", "fp32")  # runs saved before the option have fp32 moments
    if optim in ("sgd", "adam"):
        groups = [{"params": list(model.parameters()), "reg": NoReg(), "name": "all"}]
    else:
        parts = _param_groups(model)
        regs = {"linear": _reg(cfg["linear_reg"], cfg["lamda"]), "conv": _reg(cfg["conv_reg"], cfg["lamda_conv"]),
                "skips": L1(cfg["lamda_skip"]), "other": NoReg()}
        groups = [{"params": parts[k], "reg": regs[k], "name": k} for k in ("linear", "conv", "skips", "other")
                  if parts[k]]
    if optim in ("sgd", "linbreg"):
        delta = 1.0 if optim == "sgd" else cfg["delta"]
        return LinBreg(groups, lr=lr, delta=delta, momentum=cfg["momentum"], backend=backend,
                       moments=moments if cfg["momentum"] > 0 else "fp32")
    if optim in ("adam", "adabreg"):
        return AdaBreg(groups, lr=lr, delta=1.0 if optim == "adam" else cfg["delta"], backend=backend, moments=moments)
    if optim == "proxsgd":
        return ProxSGD(groups, lr=lr, backend=backend)
    raise ValueError(f"Invalid optim: {optim!r}")


def init_weights(model: nn.Module, cfg: dict[str, Any], generator: torch.Generator) -> None:
    """The paper's init, per layer type as ``init_plan.layer_inits`` decides (and ``--help`` prints):
    sparse Kaiming-normal weights (scale r), non-negative uniform biases; the BatchNorm shifts set
    to ``bn_shift``.

    [note: BN shift] A BatchNorm after a conv removes the conv's bias, so the paper's positive biases
    no longer keep ReLUs open: a channel whose incoming kernels are all zero outputs exactly its
    shift, 0 by default, where ReLU's gradient is 0, and its kernels never get a gradient, under any
    optimizer. A positive shift reopens it (and BN's 1/√eps on a constant channel gives its kernels a
    large gradient, so the Bregman iteration switches them on within a few steps).
    """
    plan = layer_inits(cfg)
    linear, conv = plan["linear"], plan["conv"]
    if linear.mode is not None:
        sparsify_(model, linear.density, linear=linear.mode, conv=None, scale=linear.scale, generator=generator)
    if conv.mode is not None:
        sparsify_(model, conv.density, linear=None, conv=conv.mode, scale=conv.scale, generator=generator)
    for m in model.modules():
        if isinstance(m, _BATCHNORM) and m.bias is not None:
            nn.init.constant_(m.bias, cfg["bn_shift"])


# -- data -----------------------------------------------------------------------------------------
def _batches(ds: Dataset, batch_size: int, *, generator: torch.Generator | None, sampler=None,
             shuffle: bool = True, num_workers: int = 0, pin: bool = False):
    """Mini-batches of ``ds``: tensor slicing for a TensorDataset (fast), a DataLoader otherwise.

    The order comes from ``sampler`` (DistributedSampler) or a permutation drawn from ``generator``.
    """
    if isinstance(ds, TensorDataset):
        n = len(ds)
        if sampler is not None:
            idx = torch.as_tensor(list(iter(sampler)), dtype=torch.int64)
        elif shuffle:
            idx = torch.randperm(n, generator=generator)
        else:
            idx = torch.arange(n)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield tuple(t[j] for t in ds.tensors)
        return
    if sampler is None and shuffle:
        sampler = RandomSampler(ds, generator=generator)
    yield from DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin,
                          generator=generator)


def _n_batches(n: int, batch_size: int, max_batches: int | None) -> int:
    k = math.ceil(n / batch_size)
    return min(k, max_batches) if max_batches else k


def _loss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    return F.mse_loss(out, y) if regression else F.cross_entropy(out, y)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, device: torch.device, *, regression: bool = False,
             batch_size: int = 1000, max_batches: int | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) over ``ds`` (accuracy NaN for regression). Every rank evaluates all of
    ``ds`` (FSDP forwards are collectives, and the ranks then agree without communication)."""
    model.eval()
    loss = correct = n = 0.0
    for b, (x, y) in enumerate(_batches(ds, batch_size, generator=None, shuffle=False)):
        if max_batches and b >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(_loss(out, y, regression)) * len(y)
        if not regression:
            correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return loss / max(n, 1), (math.nan if regression else correct / max(n, 1))


# -- the run --------------------------------------------------------------------------------------
def _say(ctx: Context, cfg: dict[str, Any], msg: str) -> None:
    if ctx.main and not cfg.get("quiet"):
        print(msg, flush=True)


def _resumes_inside(resume: bool | str | None, out_dir: str) -> bool:
    """Whether the run continues the one in ``out_dir``: --resume alone, or a checkpoint path inside it."""
    if not resume:
        return False
    if not isinstance(resume, str):
        return True
    inside = os.path.realpath(resume), os.path.realpath(out_dir)
    return os.path.commonpath(inside) == inside[1]


def run(cfg: dict[str, Any], ctx: Context | None = None, splits: data_mod.Splits | None = None) -> list[dict[str, Any]]:
    """Train as ``cfg`` says (a resolved preset plus the run settings); return the history."""
    ctx = ctx or Context()
    device = ctx.device
    seed = int(cfg["seed"])
    if cfg["batch_size"] % ctx.world:  # [note: data order] needs equal shares of the global batch
        size = cfg["batch_size"]
        raise ValueError(f"--batch-size {size} is the global batch: it must divide by the {ctx.world} processes, "
                         f"each taking an equal share (e.g. {size - size % ctx.world} or "
                         f"{size + ctx.world - size % ctx.world})")
    if cfg.get("out_dir") and not _resumes_inside(cfg.get("resume"), cfg["out_dir"]):  # before anything runs
        # a new run, or one resumed from a checkpoint elsewhere: --out-dir must not hold another run
        ckpt.claim_out_dir(cfg["out_dir"], bool(cfg.get("overwrite")), ctx)
    if splits is None:
        splits = data_mod.load(cfg["dataset"], cfg.get("data_dir", "./data"), cfg.get("download", False),
                               augment=cfg["augment"], noise_std=cfg["noise_std"], fake_size=cfg.get("fake_data"),
                               image_size=input_size(cfg["model"]))
    info, regression = splits.info, splits.info.task == "regression"

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    net = build_model(cfg["model"], info.shape, info.num_classes or 0)
    init_weights(net, cfg, torch.Generator().manual_seed(seed))
    net.to(device)
    model = wrap(net, ctx, bool(cfg.get("fsdp")))
    opt = build_optimizer(unwrap(model), cfg, cfg.get("backend", "auto"))
    lr_sched = None
    if cfg["lr_schedule"] == "plateau":  # the paper's: on the training loss
        lr_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=cfg["plateau_factor"], patience=cfg["plateau_patience"],
            threshold=cfg["plateau_threshold"])
    lamda_sched = None
    if cfg.get("target_density") is not None:
        if opt.param_groups[0]["reg"]._params():
            lamda_sched = LamdaScheduler(opt, 0, target_density=cfg["target_density"], step=cfg["lamda_step"])
        else:  # sgd/adam, the unregularized baselines of a --compare: no λ to steer
            _say(ctx, cfg, f"--target-density {cfg['target_density']:g}: {cfg['optim']} has no regularizer, so "
                           "this run keeps its density unsteered")
    generators = {"shuffle": torch.Generator().manual_seed(seed + 1)}

    out_dir = cfg.get("out_dir")
    ckpt_path = ckpt.checkpoint_dir(out_dir) if out_dir else None
    history: list[dict[str, Any]] = []
    if cfg.get("resume"):
        path = cfg["resume"] if isinstance(cfg["resume"], str) else ckpt_path
        if path is None:
            raise ckpt.CheckpointError("--resume needs --out-dir (or a checkpoint path: --resume PATH)")
        state = ckpt.load(path, unwrap(model), opt, ctx, ckpt.identity(cfg), generators)
        history = list(state["history"])
        if lr_sched is not None and state.get("lr_sched"):
            lr_sched.load_state_dict(state["lr_sched"])
        if lamda_sched is not None and state.get("lamda_sched"):
            lamda_sched.load_state_dict(state["lamda_sched"])
        if len(history) >= cfg["epochs"]:
            _say(ctx, cfg, f"nothing to train: the run in {path} is finished ({len(history)} epochs trained, "
                           f"--epochs {cfg['epochs']}); pass a larger --epochs to continue it")
        else:
            _say(ctx, cfg, f"resumed from {path} after epoch {len(history)}")

    per_rank = max(1, cfg["batch_size"] // ctx.world)
    # [note: data order] the order is DistributedSampler's permutation of (seed, epoch) on every world
    # size, one process included: the ranks' batch k together are always the same global batch, so a
    # run resumed on another number of ranks continues with the batches it would have seen
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(splits.train, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed)
    if not history:
        from ..backends import select

        stats = sparsity_stats(model)
        group0 = opt.param_groups[0]
        _say(ctx, cfg, f"{cfg['preset']}: {cfg['dataset']} {len(splits.train)} train / {len(splits.val)} val / "
                       f"{len(splits.test)} test; model={cfg['model']} optim={cfg['optim']} lr={cfg['lr']:g} "
                       f"lamda={cfg['lamda']:g} lamda_conv={cfg['lamda_conv']:g} init density={stats['density']:.4f} "
                       f"backend={cfg.get('backend', 'auto')} "
                       f"({select(cfg.get('backend', 'auto'), device, group0['reg']).name}) device={device} "
                       f"world={ctx.world}{' fsdp' if cfg.get('fsdp') else ''}")
    max_batches = cfg.get("max_batches")
    show = ctx.main and not cfg.get("quiet")
    for epoch in range(len(history) + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        n_batches = _n_batches(len(sampler), per_rank, max_batches)
        batches = _batches(splits.train, per_rank, generator=generators["shuffle"], sampler=sampler,
                           num_workers=cfg.get("num_workers", 0), pin=device.type == "cuda")
        bar = None
        if show and cfg.get("progress", True):
            from tqdm import tqdm

            bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{cfg['epochs']}", leave=False, file=sys.stderr,
                       dynamic_ncols=True)
        loss_sum = correct = n = 0.0
        for b, (x, y) in enumerate(batches):
            if b >= n_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = _loss(out, y, regression)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            if not regression:
                correct += int((out.argmax(1) == y).sum())
            n += len(y)
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / n:.4f}")
        if bar is not None:
            bar.close()
        loss_sum, correct, n = all_reduce_sum([loss_sum, correct, n], ctx)
        train_loss = loss_sum / max(n, 1)
        # evaluated in batches of the training size: --max-batches then bounds the evaluation as it
        # bounds the epoch (a 1000-image batch through VGG takes seconds on a CPU)
        val_loss, val_acc = evaluate(model, splits.val, device, regression=regression, batch_size=per_rank,
                                     max_batches=max_batches)
        test_loss, test_acc = evaluate(model, splits.test, device, regression=regression, batch_size=per_rank,
                                       max_batches=max_batches)
        stats = sparsity_stats(model)  # collectives under FSDP: every rank
        regs = opt.evaluate_reg()
        lr_now = float(opt.param_groups[0]["lr"])
        if lr_sched is not None:
            lr_sched.step(train_loss if math.isfinite(train_loss) else math.inf)
        if lamda_sched is not None:
            # it steers group 0: the Linear weights (sparsity_stats already reduced them over ranks);
            # any other first group is counted by the scheduler itself
            group0 = opt.param_groups[0].get("name")
            lamda_sched.step(stats["linear_density"] if group0 == "linear" else None)
        lamdas = next((g["reg"]._params() for g in opt.param_groups if g["reg"]._params()), {})
        row = dict(epoch=epoch, train_loss=train_loss,
                   train_acc=math.nan if regression else correct / max(n, 1),
                   val_loss=val_loss, val_acc=val_acc, test_loss=test_loss, test_acc=test_acc, **stats,
                   reg=float(sum(regs)), **{f"reg_{g['name']}": float(r) for g, r in zip(opt.param_groups, regs)},
                   lamda=float(next(iter(lamdas.values()))) if lamdas else 0.0, lr=lr_now,
                   seconds=time.perf_counter() - t0)
        history.append(row)
        if show:
            acc = "" if regression else f" acc {row['train_acc']:.4f}"
            tacc = "" if regression else f" acc {row['test_acc']:.4f}"
            vacc = "" if regression else f" acc {row['val_acc']:.4f}"
            print(f"epoch {epoch:3d}  train loss {train_loss:.4f}{acc}  val loss {val_loss:.4f}{vacc}  "
                  f"test loss {test_loss:.4f}{tacc}  density {row['density']:.4f}  "
                  f"nodes {row['node_density']:.3f}  J {row['reg']:.4g}  lr {lr_now:g}  ({row['seconds']:.2f}s)",
                  flush=True)
            if not math.isfinite(train_loss):
                print("loss is not finite: training diverged (for AdaBreg, is lr ~1e-3?)", flush=True)
        if out_dir:
            _write_outputs(ctx, cfg, history, plot=False)  # the plot only at the end: matplotlib is slow
            train_state = {"identity": ckpt.identity(cfg), "epoch": epoch, "history": history,
                           "lr_sched": lr_sched.state_dict() if lr_sched is not None else None,
                           "lamda_sched": lamda_sched.state_dict() if lamda_sched is not None else None}
            ckpt.save(ckpt_path, unwrap(model), opt, train_state, ctx, generators)
            if cfg.get("keep_checkpoints") and ctx.main:  # a copy per epoch: resume from any of them
                import shutil

                keep = f"{ckpt_path}-epoch{epoch:04d}"
                if os.path.exists(keep):
                    shutil.rmtree(keep)
                shutil.copytree(ckpt_path, keep)
    if out_dir and history:
        _write_outputs(ctx, cfg, history)  # and the plot (also after resuming a finished run)
    return history


def _write_outputs(ctx: Context, cfg: dict[str, Any], history: list[dict[str, Any]], plot: bool = True) -> None:
    if not ctx.main:
        return
    out_dir = cfg["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    config = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, type(None)))}
    hist_mod.save_history(history, out_dir, config)
    if plot and cfg.get("plot", True):
        hist_mod.plot_history(history, os.path.join(out_dir, "history.png"),
                              f"{cfg['preset']} / {cfg['optim']}")
