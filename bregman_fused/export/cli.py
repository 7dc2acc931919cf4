"""``python -m bregman_fused.export CHECKPOINT --out DIR``: export a training checkpoint.

CHECKPOINT is a run's ``--out-dir`` or its ``checkpoint`` folder (``python -m bregman_fused.train
--out-dir RUN``). The model is rebuilt from the checkpoint's recorded preset/model/data set, its
weights loaded, then DIR gets:

``sparse.pt``   ``save_sparse`` of the trained model: loads into the model as built by the run
                (``model.load_state_dict(export.load_sparse(path))``);
``shrunk.pt``   ``save_sparse`` of ``shrink(model)``: ``export.resize_like(model, state)`` first;
``report.txt``  the report of the trained model, of the shrunk + ``to_sparse`` model, and the sizes.

``train --export`` calls ``export_checkpoint`` on the run's final checkpoint.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from typing import Any, Sequence

import torch

from .convert import DENSITY_THRESHOLD, MIN_NUMEL, to_sparse
from .errors import ExportError
from .report import report
from .serialize import save_sparse
from .shrink import shrink

__all__ = ["load_checkpoint", "export_checkpoint", "main"]


def load_checkpoint(path: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the model with the checkpoint's weights, in eval mode; the run's identity)."""
    import torch.distributed.checkpoint as dcp

    from ..experiments import checkpoint as ckpt
    from ..experiments.data import DATASETS, padded
    from ..experiments.models import build_model, input_size

    if os.path.isdir(ckpt.checkpoint_dir(path)) and not ckpt.exists(path):
        path = ckpt.checkpoint_dir(path)  # the run's --out-dir
    elif os.path.isdir(path) and not _has_checkpoint_files(path):
        raise ExportError(_not_a_checkpoint(path))
    try:
        state = ckpt.read_train_state(path)
    except ckpt.CheckpointError as e:
        raise ExportError(f"{e}; CHECKPOINT is a run's --out-dir or its checkpoint folder") from e
    identity = state.get("identity", {})
    if identity.get("dataset") not in DATASETS or not identity.get("model"):
        raise ExportError(f"checkpoint {path!r} does not record its model and data set (identity {identity!r})")
    # the shape the model was trained on: VGG pads MNIST's 28×28 to 32×32 (experiments/loop.py)
    info = padded(DATASETS[identity["dataset"]], input_size(identity["model"]))
    model = build_model(identity["model"], info.shape, info.num_classes)
    sd = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
            dcp.load(sd, checkpoint_id=path, no_dist=True)  # one process, even inside a torchrun job
        model.load_state_dict(sd["model"])
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ExportError(f"cannot load the model weights of checkpoint {path!r} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from e
    return model.eval(), {**identity, "input_shape": list(info.shape), "path": path}


def _has_checkpoint_files(path: str) -> bool:
    """Whether ``path`` holds what a save writes (its train state or DCP's shards): a folder that holds
    some of it is a checkpoint cut short, one that holds none is another folder altogether."""
    from ..experiments.checkpoint import STATE_FILE

    return any(n == STATE_FILE or n == ".metadata" or n.endswith(".distcp") for n in os.listdir(path))


def _not_a_checkpoint(path: str) -> str:
    from ..experiments import checkpoint as ckpt

    runs = sorted(os.path.join(path, n) for n in os.listdir(path)
                  if os.path.isdir(ckpt.checkpoint_dir(os.path.join(path, n))))
    if runs:  # a --compare output: one run per optimizer, each in its own folder
        return (f"{path!r} is not a checkpoint folder but holds runs in its subfolders ({', '.join(runs)}), as "
                "train --compare writes them; export one of those: python -m bregman_fused.export "
                f"{runs[0]} --out DIR")
    return (f"{path!r} is not a checkpoint folder (no checkpoint/ subfolder, no train_state.pt); CHECKPOINT is "
            "the --out-dir of a python -m bregman_fused.train run or its checkpoint folder")


def _dense_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def export_checkpoint(path: str, out_dir: str, *, batch: int = 8, threshold: float = DENSITY_THRESHOLD,
                      min_numel: int = MIN_NUMEL, measure_batch: int | None = None, seed: int = 0) -> str:
    """Export the checkpoint at ``path`` into ``out_dir``; return the report text (also in report.txt)."""
    if batch < 1:
        raise ExportError(f"--batch {batch}: shrink needs at least 1 example input; pass --batch 1 or more")
    model, identity = load_checkpoint(path)
    x = torch.randn(batch, *identity["input_shape"], generator=torch.Generator().manual_seed(seed))
    small = shrink(model, x)
    fast = to_sparse(small, threshold=threshold, min_numel=min_numel, measure_batch=measure_batch)
    os.makedirs(out_dir, exist_ok=True)
    meta = {k: identity.get(k) for k in ("preset", "dataset", "model", "optim", "seed", "input_shape")}
    full = save_sparse(model, os.path.join(out_dir, "sparse.pt"), meta={**meta, "kind": "trained"})
    shrunk = save_sparse(small, os.path.join(out_dir, "shrunk.pt"), meta={**meta, "kind": "shrunk"})
    dense = _dense_bytes(model)
    with torch.no_grad():
        diff = float((fast(x) - model(x)).abs().max())
    n_params = lambda m: sum(t.numel() for t in m.state_dict().values() if t.is_floating_point())  # noqa: E731
    text = "\n".join([
        f"# export of {identity['path']} ({identity.get('preset')}: {identity.get('model')} on "
        f"{identity.get('dataset')}, {identity.get('optim')})",
        "", "## trained model", str(report(model, x)),
        "", "## shrink + to_sparse", str(report(fast, x)),
        "", "## files",
        f"dense checkpoint (torch.save of the state dict): {dense:,} B",
        f"sparse.pt (trained model, save_sparse): {full['bytes']:,} B ({dense / full['bytes']:.1f}× smaller)",
        f"shrunk.pt (shrunk model, save_sparse): {shrunk['bytes']:,} B ({dense / shrunk['bytes']:.1f}× smaller); "
        f"parameters {n_params(model):,} -> {n_params(small):,}",
        f"max |output difference| of shrink + to_sparse on {batch} random inputs: {diff:.2e}",
    ])
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(text + "\n")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bregman_fused.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a training run's --out-dir or its checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR", help="where sparse.pt, shrunk.pt and report.txt go")
    p.add_argument("--batch", type=int, default=8, help="example inputs (random, the data set's shape) for shrink")
    p.add_argument("--threshold", type=float, default=DENSITY_THRESHOLD,
                   help="to_sparse: CSR for Linear layers at most this dense")
    p.add_argument("--min-numel", type=int, default=MIN_NUMEL, help="to_sparse: and with at least this many weights")
    p.add_argument("--measure-batch", type=int, default=None,
                   help="to_sparse: time dense vs CSR per layer at this batch size instead of the rule")
    p.add_argument("--quiet", action="store_true", help="do not print the report")
    return p


def _bad_argument(args: argparse.Namespace) -> str | None:
    """A value no export can use, as an ``error:`` text naming its flag (checked before any loading)."""
    if args.batch < 1:
        return f"--batch {args.batch}: shrink needs at least 1 example input; pass --batch 1 or more"
    if args.measure_batch is not None and args.measure_batch < 1:
        return f"--measure-batch {args.measure_batch}: must be a positive batch size (or leave it out)"
    if args.min_numel < 0:
        return f"--min-numel {args.min_numel}: must be 0 or a positive number of weights"
    if not args.out.strip():
        return "--out is empty: name the folder that sparse.pt, shrunk.pt and report.txt go into"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out {args.out!r} is a file, not a folder: name a new or existing folder"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _bad_argument(args)
    if problem:
        parser.error(problem)
    try:
        text = export_checkpoint(args.checkpoint, args.out, batch=args.batch, threshold=args.threshold,
                                 min_numel=args.min_numel, measure_batch=args.measure_batch)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(text)
    return 0
