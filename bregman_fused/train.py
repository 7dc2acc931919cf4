"""Sparse training with Bregman iterations: ``python -m bregman_fused.train``.

Presets reproduce the paper's experiments (``--preset``, see ``--help``); every hyper-parameter of a
preset can be overridden (``--preset convnet-fashionmnist --lr 0.05 --lamda 0.3``). The default
preset, ``digits`` (scikit-learn's bundled 8×8 digits, MLP 64-200-80-10), runs offline.

    python -m bregman_fused.train --optim linbreg --out-dir runs/digits
    python -m bregman_fused.train --preset convnet-fashionmnist --download --out-dir runs/convnet
    python -m bregman_fused.train --compare sgd linbreg proxsgd adabreg --out-dir runs/cmp
    python -m bregman_fused.train --out-dir runs/digits --resume        # continue exactly
    torchrun --nproc_per_node 2 -m bregman_fused.train --fsdp --out-dir runs/fsdp

With ``--out-dir`` every epoch writes history.json/.csv, history.png and a checkpoint; ``--resume``
continues bit for bit (and on another number of ranks). A new run into an ``--out-dir`` that holds
another run is refused unless ``--overwrite`` (which removes the old run's outputs first). ``--export`` ends the run with
``python -m bregman_fused.export`` on the final checkpoint (into OUT_DIR/export). ``train(args)`` returns the history (a list
of dicts, keys in ``bregman_fused.experiments.loop``) and is what the tests call.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .experiments import flag_checks
from .experiments.init_plan import describe as describe_init
from .experiments.init_plan import has_convs
from .experiments.presets import DEFAULT_PRESET, FIELDS, OPTIMIZERS, PRESETS, resolve

__all__ = ["build_parser", "parse_args", "resolve_args", "train", "compare", "main"]

_RUN_KEYS = ("seed", "backend", "device", "threads", "out_dir", "resume", "overwrite", "max_batches", "fake_data", "data_dir",
             "download", "num_workers", "quiet", "fsdp", "plot", "progress", "keep_checkpoints")


def _presets_epilog() -> str:
    lines = ["presets (per optimizer: lr, λ of the Linear / Conv weights, and the init per layer type:",
             "how weights are sparsified, their density and the factor on the Kaiming std):"]
    for p in PRESETS.values():
        lines.append(f"  {p.name}  [{p.optim}] {p.description}")
        for o in OPTIMIZERS:
            v = p.resolved(o)
            lamdas = f"lamda {v['lamda']:g}" + (f" / {v['lamda_conv']:g}" if has_convs(v) else "")
            lines.append(f"      {o:8s} lr {v['lr']:g}, {lamdas}; init: {describe_init(v)}")
        if p.paper:
            lines.append(f"      paper: {p.paper}")
    lines += ["", "AdaBreg is Adam-type: use lr ~1e-3. At lr = 0.1 every coordinate crosses the threshold,",
              "the net densifies and diverges (the known reproduction failure).",
              "'sgd' is LinBreg with no regularizer (SGD = LinBreg with lamda = 0); 'adam' is AdaBreg with none."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bregman_fused.train", epilog=_presets_epilog(),
                                description="Sparse training with Bregman iterations (LinBreg, AdaBreg, ProxSGD).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help="experiment (default: digits)")
    p.add_argument("--optim", choices=OPTIMIZERS, default=None, help="optimizer (default: the preset's)")
    p.add_argument("--compare", nargs="+", choices=OPTIMIZERS, metavar="OPTIM",
                   help="train several optimizers with the same seed and plot them together (into --out-dir/OPTIM/); "
                        "a hyper-parameter flag applies to the compared optimizers it concerns (--momentum to "
                        "sgd/linbreg, --lamda and --delta to the regularized ones, --moments to those that keep "
                        "moments) and is refused only when it concerns none of them")
    hp = p.add_argument_group("hyper-parameters (default: the preset's value for the optimizer)")
    for name, (typ, help_text) in FIELDS.items():
        choices = getattr(typ, "choices", None)
        hp.add_argument("--" + name.replace("_", "-"), dest=name, type=str if choices else typ, choices=choices,
                        default=argparse.SUPPRESS, help=help_text)
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seeds the init, the data order and all other draws")
    run.add_argument("--out-dir", default=None,
                     help="where history.json/.csv, history.png and the checkpoint go (nothing is saved without it)")
    run.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                     help="continue from --out-dir's checkpoint (or the given checkpoint folder); exact")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out-dir (its history, checkpoints, export); without it "
                          "a new run into a used --out-dir is refused")
    run.add_argument("--keep-checkpoints", action="store_true",
                     help="also keep each epoch's checkpoint as checkpoint-epochNNNN (resume from any: --resume PATH)")
    run.add_argument("--data-dir", default="./data", help="root of the torchvision data sets")
    run.add_argument("--download", action="store_true", help="download the data set into --data-dir if missing")
    run.add_argument("--fake-data", type=int, default=None, metavar="N",
                     help="use torchvision FakeData (N training images) shaped like the data set: smoke tests")
    run.add_argument("--max-batches", type=int, default=None, help="at most this many batches per epoch and eval")
    run.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda", "triton"),
                     help="optimizer backend (auto: the fused one when available)")
    run.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:1 …")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads for torch (1 is fastest for the tiny models; 0 = leave as is)")
    run.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun: shard with FSDP2 (fully_shard per Linear/Conv + root); default DDP")
    run.add_argument("--export", action="store_true",
                     help="at the end, export the final checkpoint into OUT_DIR/export (shrunk model, sparse "
                          "checkpoint, report; see python -m bregman_fused.export); needs --out-dir")
    run.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG plots")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    run.add_argument("--quiet", action="store_true", help="no output")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; flags that contradict each other or this machine end the process as
    argparse does (one ``error:`` line, exit status 2) before anything runs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = (_conflicting_flags(args) or flag_checks.bad_number(args) or flag_checks.inapplicable_flag(args)
               or _device_problem(args))
    if problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    return args


def _conflicting_flags(args: argparse.Namespace) -> str | None:
    if args.compare and args.optim:
        return (f"--optim {args.optim} and --compare exclude each other: --compare names the optimizers to run "
                f"(e.g. --compare {' '.join(dict.fromkeys([*args.compare, args.optim]))})")
    if args.compare:
        twice = sorted({o for o in args.compare if args.compare.count(o) > 1})
        if twice:
            return f"--compare lists {', '.join(twice)} more than once: each optimizer runs once, into OUT_DIR/OPTIM"
    if args.overwrite and args.resume:
        return "--overwrite and --resume exclude each other: --resume continues the run in --out-dir, --overwrite " \
               "replaces it"
    return None


def _device_problem(args: argparse.Namespace) -> str | None:
    """A --device / --backend this machine cannot run, said before the run starts (instead of a
    traceback from deep inside the first step)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = None
    if args.device not in ("auto", ""):
        try:
            device = torch.device(args.device)
        except RuntimeError:
            return f"--device {args.device!r} is not a torch device; use auto, cpu, cuda or cuda:N"
        if device.type not in ("cpu", "cuda"):  # meta, mps, xpu …: the loop and the backends run on cpu/cuda only
            return f"--device {args.device}: runs train on cpu or cuda only; use auto, cpu, cuda or cuda:N"
        if device.type == "cuda" and gpus == 0:
            return (f"--device {args.device}: no CUDA GPU is visible to torch here (torch.cuda.is_available() is "
                    "False); use --device cpu or --device auto")
        if device.type == "cuda" and device.index is not None and device.index >= gpus:
            return f"--device {args.device}: torch sees {gpus} GPU(s), cuda:0 to cuda:{gpus - 1}; change --device"
    on_gpu = device.type == "cuda" if device is not None else gpus > 0
    if args.backend in ("cuda", "triton") and not on_gpu:
        if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return None  # Triton's interpreter on the CPU (the tests)
        where = "no CUDA GPU is visible to torch here" if gpus == 0 else "--device is cpu"
        return f"--backend {args.backend} updates CUDA tensors, but {where}; use --backend auto (or cpu)" + \
            ("" if gpus == 0 else " or --device cuda")
    if args.backend == "cpu" and on_gpu:
        return "--backend cpu updates CPU tensors, but the run is on the GPU; use --device cpu or --backend auto"
    return None


def resolve_args(args: argparse.Namespace, optim: str | None = None) -> dict[str, Any]:
    """The run's full configuration: preset values, then the command line's."""
    a = vars(args)
    # only the flags that were given are in the namespace (default=SUPPRESS): "--init-scale none" overrides too
    overrides = {k: a[k] for k in FIELDS if k in a}
    if optim is not None and a.get("compare"):  # a flag goes to the compared optimizers it concerns
        overrides = flag_checks.applicable_overrides(a["preset"], optim, overrides, a.get("fake_data"))[0]
    cfg = resolve(a["preset"], optim or a.get("optim"), overrides)
    cfg.update({k: a.get(k) for k in _RUN_KEYS if k in a})
    return cfg


def _with_threads(fn, threads: int | None):
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def train(args: argparse.Namespace, datasets: Any = None, ctx: Any = None) -> list[dict[str, Any]]:
    """Train as the arguments say; return one dict per epoch.

    ``datasets``: a ``data.Splits`` or a (train, test) / (train, val, test) tuple overriding loading
    (tests pass FakeData this way; with a pair, the test set doubles as validation set).
    """
    from .experiments import data
    from .experiments.loop import run
    from .experiments.parallel import setup

    cfg = resolve_args(args)
    _check_export(args, cfg)
    ctx = ctx or setup(cfg["device"])
    splits = datasets
    if datasets is not None and not isinstance(datasets, data.Splits):
        parts = tuple(datasets)
        train_ds, val_ds, test_ds = parts if len(parts) == 3 else (parts[0], parts[1], parts[1])
        splits = data.Splits(train_ds, val_ds, test_ds, data.DATASETS[cfg["dataset"]])
    history = _with_threads(lambda: run(cfg, ctx, splits), cfg.get("threads"))
    _export(args, cfg, ctx)
    return history


def _check_export(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    if getattr(args, "export", False) and not cfg.get("out_dir"):
        raise ValueError("--export needs --out-dir: it exports the run's final checkpoint")


def _export(args: argparse.Namespace, cfg: dict[str, Any], ctx: Any) -> None:
    """``--export``: the final checkpoint into OUT_DIR/export (rank 0 only; it reads the checkpoint alone)."""
    if not getattr(args, "export", False) or not ctx.main:
        return
    from .experiments.checkpoint import checkpoint_dir
    from .export.cli import export_checkpoint

    out = os.path.join(cfg["out_dir"], "export")
    text = _with_threads(lambda: export_checkpoint(checkpoint_dir(cfg["out_dir"]), out), cfg.get("threads"))
    if not cfg.get("quiet"):
        print(f"\nexported to {out}:\n{text}", flush=True)


def compare(args: argparse.Namespace, optims: Sequence[str], ctx: Any = None) -> dict[str, list[dict[str, Any]]]:
    """Run each optimizer with the same seed into ``out_dir/<optim>/``; write compare.png/.json/.csv."""
    from .experiments import checkpoint as ckpt
    from .experiments import history as hist
    from .experiments.loop import run
    from .experiments.parallel import setup

    base = resolve_args(args)
    _check_export(args, base)
    ctx = ctx or setup(base["device"])
    out_dir = base["out_dir"]
    if out_dir and not base.get("resume"):  # the compare files, every OPTIM/ and a single run, before any trains
        ckpt.claim_out_dir(out_dir, bool(base.get("overwrite")), ctx, compare=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for optim in optims:
        cfg = resolve_args(args, optim)
        if out_dir:
            cfg["out_dir"] = os.path.join(out_dir, optim)
            if cfg.get("resume") is True and not os.path.exists(ckpt.checkpoint_dir(cfg["out_dir"])):
                cfg["resume"] = None  # not started before the interruption: start it now
        elif cfg.get("resume"):
            raise ckpt.CheckpointError("--compare --resume needs --out-dir")
        results[optim] = _with_threads(lambda: run(cfg, ctx), cfg.get("threads"))
        _export(args, cfg, ctx)
    if out_dir and ctx.main:
        finals = [{"optim": o, **h[-1]} for o, h in results.items() if h]
        hist.save_history(finals, out_dir, {"preset": base["preset"], "optims": list(optims)}, stem="compare")
        if base.get("plot", True):
            hist.plot_compare(results, os.path.join(out_dir, "compare.png"), f"{base['preset']}: " + " / ".join(optims))
        if not base.get("quiet"):
            print("\n" + summary_table(results), flush=True)
    return results


def summary_table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| optimizer | test acc | test loss | density | node density |", "|---|---|---|---|---|"]
    for o, h in results.items():
        if h:
            r = h[-1]
            lines.append(f"| {o} | {r['test_acc']:.4f} | {r['test_loss']:.4f} | {r['density']:.4f} | "
                         f"{r['node_density']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .experiments.checkpoint import CheckpointError
    from .experiments.data import DatasetNotFoundError
    from .experiments.parallel import setup, teardown

    try:
        ctx = setup(args.device)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.compare:
            compare(args, args.compare, ctx)
        else:
            train(args, ctx=ctx)
    except (DatasetNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
