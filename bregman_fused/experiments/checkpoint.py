"""Checkpoints that resume a run exactly, on the same or a different number of ranks.

Layout: ``<out_dir>/checkpoint/`` holds the model and optimizer as a ``torch.distributed.checkpoint``
(DCP) save of ``get_state_dict(model, opt)`` — each rank writes its own shards, and ``dcp.load``
reshards them for any world size (FSDP2 → one process and back) — plus ``train_state.pt``
(rank 0, ``torch.save``): format version, the run's identity (preset, data set, model, optimizer,
regularizers, seed), the epoch, the history, the LR and λ schedulers' states and the RNG states
(torch CPU/CUDA, numpy, python ``random``, the data-order generator; one set per rank).

Saving is atomic: everything goes to ``checkpoint.tmp/`` first; ``train_state.pt`` is written
last, then the folder is renamed into place. A folder without ``train_state.pt`` is incomplete.
Loading never falls back silently: a missing, incomplete, unreadable or mismatched checkpoint
raises ``CheckpointError`` naming the path and the reason.
"""
from __future__ import annotations

import os
import random
import shutil
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .parallel import Context, barrier

__all__ = ["CheckpointError", "FORMAT", "IDENTITY_KEYS", "RUN_ONLY_KEYS", "identity", "checkpoint_dir", "exists",
           "RUN_FILES", "COMPARE_FILES", "run_outputs", "compare_outputs", "claim_out_dir", "save", "load",
           "rng_state", "set_rng_state"]

FORMAT = "bregman_fused.train/1"
# What may differ between a run and its resumption: how long it runs, where and on what it runs,
# what it prints. Every other setting (lr, λ, batch size, init, schedules, ...) shapes the run and
# must match: a resumed run with another --lr would otherwise continue with the checkpoint's lr
# without a word (the optimizer state carries it) while a new --batch-size silently took effect.
RUN_ONLY_KEYS = ("epochs", "out_dir", "resume", "overwrite", "quiet", "plot", "progress", "threads", "num_workers",
                 "keep_checkpoints", "device", "backend", "data_dir", "download", "fsdp")
IDENTITY_KEYS = ("preset", "dataset", "model", "optim", "linear_reg", "conv_reg", "seed")  # named first in errors
STATE_FILE = "train_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another run, or a new run would
    overwrite another run's outputs."""


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoint")


def exists(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_FILE))


# -- the out dir of a new run --------------------------------------------------------------------
# what a run writes into its --out-dir: history.*, the checkpoint and its save/keep copies, --export
RUN_FILES = ("history.json", "history.csv", "history.png", "checkpoint", "checkpoint.tmp", "checkpoint.old", "export")
RUN_PREFIXES = ("checkpoint-epoch",)  # --keep-checkpoints copies
COMPARE_FILES = ("compare.json", "compare.csv", "compare.png")  # what train --compare writes into --out-dir


def run_outputs(out_dir: str, files: tuple[str, ...] = RUN_FILES, prefixes: tuple[str, ...] = RUN_PREFIXES) -> list[str]:
    """The names in ``out_dir`` that a run writes (another run's outputs, if any), sorted."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if n in files or n.startswith(prefixes))


def compare_outputs(out_dir: str) -> list[str]:
    """What a ``train --compare`` wrote into ``out_dir``: compare.*, and "OPTIM/" for each optimizer's
    subfolder that holds a run, sorted."""
    from .presets import OPTIMIZERS

    found = run_outputs(out_dir, COMPARE_FILES, ())
    return found + sorted(f"{o}/" for o in OPTIMIZERS if run_outputs(os.path.join(out_dir, o)))


def claim_out_dir(out_dir: str, overwrite: bool, ctx: Context, compare: bool = False) -> None:
    """A new run or --compare into ``out_dir``: refuse when another run's or --compare's outputs are
    there, unless ``overwrite``; then remove them first, so that no old checkpoint, kept copy,
    export or compared run outlives the new one (a single run and a --compare into the same folder
    would mix their files: export and --resume would then find the other's). ``compare``: the new
    one is a --compare."""
    single, compared = run_outputs(out_dir), compare_outputs(out_dir)
    if (single or compared) and not overwrite:
        found = ", ".join(single + compared)
        if bool(compared) == compare:  # the same kind: --resume can continue it
            raise CheckpointError(f"--out-dir {out_dir!r} holds another {'--compare ' if compare else ''}run "
                                  f"({found}); pass --resume to continue it, --overwrite to replace it, or choose "
                                  "another --out-dir")
        there, new = ("a --compare run", "a single run") if compared else ("a single run", "a --compare")
        raise CheckpointError(f"--out-dir {out_dir!r} holds {there} ({found}): {new} into it would mix with it; "
                              "choose another --out-dir, or pass --overwrite to replace it")
    if ctx.main:
        for name in single + [n for n in compared if not n.endswith("/")]:
            _remove(os.path.join(out_dir, name))
        for sub in (os.path.join(out_dir, n) for n in compared if n.endswith("/")):
            for name in run_outputs(sub):  # only the run's files: anything else the user put there stays
                _remove(os.path.join(sub, name))
            if not os.listdir(sub):
                os.rmdir(sub)
    barrier(ctx)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


# -- RNG ------------------------------------------------------------------------------------------
def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """This process's RNG states as plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_version, list(py_internal), py_gauss],
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    for k, g in generators.items():
        g.set_state(state["generators"][k])


def _gather_rng(ctx: Context, generators: dict[str, torch.Generator]) -> list[dict[str, Any]]:
    mine = rng_state(generators)
    if not ctx.distributed:
        return [mine]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, mine)
    return out


# -- save / load ----------------------------------------------------------------------------------
def save(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, train_state: dict[str, Any], ctx: Context,
         generators: dict[str, torch.Generator]) -> None:
    """Write the checkpoint atomically (every rank calls this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path + ".tmp"
    rngs = _gather_rng(ctx, generators)  # collective: before anything that only rank 0 does
    if ctx.main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier(ctx)
    model_sd, optim_sd = get_state_dict(model, opt)
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    barrier(ctx)
    if ctx.main:
        state = {"format": FORMAT, "world_size": ctx.world, "rng": rngs, **train_state}
        torch.save(state, os.path.join(tmp, STATE_FILE + ".part"))
        os.replace(os.path.join(tmp, STATE_FILE + ".part"), os.path.join(tmp, STATE_FILE))
        old = path + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    barrier(ctx)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return ""
    # DCP wraps the rank's traceback: its last line is the actual error
    return lines[0][:300] if len(lines) == 1 else f"{lines[0][:150]} … {lines[-1][:300]}"


def read_train_state(path: str) -> dict[str, Any]:
    """The rank-0 part of a checkpoint, checked for completeness and format."""
    if not os.path.isdir(path):
        # a save killed between its renames (save_checkpoint) leaves the new one in .tmp, complete
        # once its train state is written, and the previous one in .old
        left = [p for p in (path + ".tmp", path + ".old") if os.path.isfile(os.path.join(p, STATE_FILE))]
        if left:
            raise CheckpointError(f"no checkpoint at {path!r}, but a save was interrupted between its renames: "
                                  f"{' and '.join(map(repr, left))} {'are' if len(left) > 1 else 'is'} complete "
                                  f"({left[0]!r} the newer); resume with --resume {left[0]}, or rename it to {path!r}")
        raise CheckpointError(f"no checkpoint at {path!r} (expected the folder a run writes into --out-dir)")
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {STATE_FILE} is missing (interrupted save?)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / garbage / not a torch file
        raise CheckpointError(f"checkpoint {path!r} is corrupt: cannot read {STATE_FILE} ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a {FORMAT} checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    return state


def identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings of a run that its checkpoint must share to be resumed (plain data)."""
    return {k: v for k, v in cfg.items() if k not in RUN_ONLY_KEYS}


def check_identity(path: str, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    # a key the checkpoint does not record (written by an older version) cannot be checked
    keys = list(IDENTITY_KEYS) + sorted(k for k in expected if k not in IDENTITY_KEYS)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {expected.get(k)!r}"
             for k in keys if (k in saved or k in IDENTITY_KEYS) and saved.get(k) != expected.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path!r} belongs to a different run ({'; '.join(diffs)}); resume with "
                              "the settings it was started with (only --epochs, --out-dir, --device, --backend, "
                              "threads/workers and output options may change), or use another --out-dir")


def load(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, ctx: Context, identity: dict[str, Any],
         generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Restore model, optimizer and RNGs from ``path``; return the train state (epoch, history, schedulers)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    state = read_train_state(path)
    check_identity(path, state.get("identity", {}), identity)
    model_sd, optim_sd = get_state_dict(model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
            dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {path!r} does not fit this model/optimizer or is corrupt "
                              f"({type(e).__name__}: {_first_line(e)})") from e
    rngs = state["rng"]
    # the same world size gets each rank's own RNG back; another one continues from rank 0's
    set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world else rngs[0], generators)
    return state
