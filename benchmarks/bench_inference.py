#!/usr/bin/env python
"""Inference benchmark of sparse export (issue 16): dense vs oneDNN dense vs shrunk vs to_sparse.

Per workload and batch size every provider runs the same inputs, interleaved round-robin (one
timed sample each, the order rotated every repetition), so that a noisy neighbour or a drifting
clock hits them alike; medians and the 20th/80th percentiles go to a CSV with the machine's info.

    python benchmarks/bench_inference.py                       # all workloads, batches 1/32/256
    python benchmarks/bench_inference.py --quick               # smoke run (seconds)
    python benchmarks/bench_inference.py --workloads mlp4096 --densities 0.02 --batches 1,32
    python benchmarks/bench_inference.py --calibrate           # break-even density of CSR per batch

Providers: ``dense`` (the model, eval, ``torch.no_grad``), ``onednn`` (``torch.utils.mkldnn.to_mkldnn``,
the fastest dense path on this CPU; MLPs only), ``shrunk`` (``export.shrink``), ``sparse``
(``export.to_sparse`` of the model), ``shrunk+sparse`` (``to_sparse`` of the shrunk model). On CUDA:
``dense``, ``sparse`` (CSR on cuSPARSE) and ``2:4`` (``torch.sparse.to_sparse_semi_structured`` of
every Linear weight that already has at most 2 non-zeros in each group of 4 — exact, no pruning).
Workloads: ``digits`` (the MLP of the default training job, trained here in ~10 s unless
``--checkpoint`` names a run), ``mlp4096`` (MLP 1024-4096-4096-10 at ``--densities``), ``convnet``
(the paper's ConvNet: conv kernels at 3.6 %, Linear weights at 3.4 %), ``resnet18`` (CIFAR
ResNet-18, conv kernels at 3.4 %) and ``resnet18-half`` (the same 3.4 %, all in half of the channels
of every layer, the other half dead: zero after BatchNorm), built by the package's sparse init.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import bregman_fused  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report import loadavg, machine_info, write_csv  # noqa: E402  (one copy of the machine info and CSV writer)
from timing import percentile  # noqa: E402

from bregman_fused import export  # noqa: E402
from bregman_fused.experiments.models import MLP, ConvNet, ResNet18  # noqa: E402
from bregman_fused.init import sparsify_  # noqa: E402

WORKLOADS = ("digits", "mlp4096", "convnet", "resnet18", "resnet18-half")
CSV_COLUMNS = ["date_utc", "machine", "cpu_model", "cpu_cores", "torch_threads", "gpu_name", "torch_version",
               "git_commit", "loadavg_1m", "device", "workload", "density", "batch", "provider", "params",
               "median_ms", "p20_ms", "p80_ms", "reps", "speedup_vs_dense", "speedup_vs_onednn", "max_abs_diff",
               "status", "note"]


# -- workloads --------------------------------------------------------------------------------------
def _density(model: torch.nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws)


def _digits(checkpoint: str | None) -> torch.nn.Module:
    from bregman_fused.export.cli import load_checkpoint

    if checkpoint is None:  # the default job: python -m bregman_fused.train --out-dir RUN
        from bregman_fused.train import parse_args, train

        checkpoint = tempfile.mkdtemp(prefix="bench-digits-")
        train(parse_args(["--out-dir", checkpoint, "--quiet", "--no-plot", "--device", "cpu"]))
    return load_checkpoint(checkpoint)[0]


def build(workload: str, density: float | None, checkpoint: str | None, seed: int = 0):
    """(model in eval mode, per-sample input shape, density label)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if workload == "digits":
        return _digits(checkpoint), (64,), None
    if workload == "mlp4096":
        m = MLP((1024, 4096, 4096, 10))
        sparsify_(m, density, linear="elementwise", conv=None, generator=g)
        return m.eval(), (1024,), density
    if workload == "convnet":  # the paper's: 3.6 % of the kernels, 3.4 % of the linear weights
        m = ConvNet()
        sparsify_(m, 0.034, linear="elementwise", conv=None, generator=g)
        sparsify_(m, 0.036, linear=None, conv="kernel", generator=g)
        return m.eval(), (1, 28, 28), None
    if workload == "resnet18":  # the paper's 3.4 %, on the conv kernels (the Linear stays dense)
        m = ResNet18()
        sparsify_(m, 0.034, linear=None, conv="kernel", generator=g)
        return m.eval(), (3, 32, 32), None
    if workload == "resnet18-half":  # 3.4 % of the kernels, all in one half of the channels
        m = ResNet18()
        sparsify_(m, 0.068, linear=None, conv="kernel", generator=g)
        _kill_half(m, g)
        return m.eval(), (3, 32, 32), None
    raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")


@torch.no_grad()
def _kill_half(m: ResNet18, g: torch.Generator) -> None:
    """Zero the filters of half the channels: inner channels per block, residual-stream channels per
    stage (in every conv that adds to that stream). BatchNorm as initialised maps 0 to 0, so these
    channels are zero after BN + ReLU: what a trained net's dead channels look like to shrink."""
    def half(n):
        return torch.randperm(n, generator=g)[: n // 2]

    for s, stage in enumerate(m.layers):
        width = stage[0].conv2.out_channels
        stream = half(width)
        producers = [b.conv2 for b in stage] + [c for c in stage[0].shortcut if isinstance(c, torch.nn.Conv2d)]
        if s == 0:
            producers.append(m.conv1)
        for conv in producers:
            conv.weight[stream] = 0
        for b in stage:
            b.conv1.weight[half(b.conv1.out_channels)] = 0


# -- providers --------------------------------------------------------------------------------------
def _onednn(model: torch.nn.Module):
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        raise RuntimeError("oneDNN here only for the MLPs (the conv models need mkldnn tensors between layers)")
    from torch.utils import mkldnn

    return mkldnn.to_mkldnn(copy.deepcopy(model))  # it replaces the children of the model it is given


def _two_four(model: torch.nn.Module):
    from torch.sparse import to_sparse_semi_structured

    fast = copy.deepcopy(model).eval()
    n = 0
    for m in fast.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach()
            if w.shape[1] % 4 == 0 and int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2:
                m.weight = torch.nn.Parameter(to_sparse_semi_structured(w.half()), requires_grad=False)
                m.bias = None if m.bias is None else torch.nn.Parameter(m.bias.half(), requires_grad=False)
                n += 1
    if not n:
        raise RuntimeError("no Linear weight has at most 2 non-zeros per group of 4")
    return fast.half()


def providers(model, example, device: torch.device) -> dict[str, tuple]:
    """name -> (callable model or None, note/error)."""
    out: dict[str, tuple] = {"dense": (model, "")}
    if device.type == "cpu":
        try:
            out["onednn"] = (_onednn(model), "")
        except Exception as e:
            out["onednn"] = (None, str(e)[:160])
    t0 = time.perf_counter()
    small = export.shrink(model, example)
    out["shrunk"] = (small, f"shrink {time.perf_counter() - t0:.1f}s")
    out["sparse"] = (export.to_sparse(model), "")
    out["shrunk+sparse"] = (export.to_sparse(small), "")
    if device.type == "cuda":
        try:
            out["2:4"] = (_two_four(model), "fp16 weights")
        except Exception as e:
            out["2:4"] = (None, str(e)[:160])
    return out


# -- timing -----------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _inner(fn, device, target_s=2e-3) -> int:
    """Calls per timed sample so that one sample lasts ~2 ms (timer resolution, loop overhead)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return max(1, min(1000, int(target_s / max(time.perf_counter() - t0, 1e-7))))


@torch.no_grad()
def time_case(models: dict[str, torch.nn.Module], x: torch.Tensor, reps: int, device) -> dict[str, list[float]]:
    calls = {}
    for name, m in models.items():
        xin = x.half() if name == "2:4" else x
        calls[name] = (lambda m=m, xin=xin: m(xin))
        for _ in range(2):  # warm-up: MKL analyses a sparse matrix on its first products
            calls[name]()
    inner = {name: _inner(fn, device) for name, fn in calls.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for r in range(reps):
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn, k = calls[name], inner[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / k * 1e3)
    return samples


def run_workload(workload, density, batches, args, device, info, log) -> list[dict]:
    model, shape, dlabel = build(workload, density, args.checkpoint)
    model = model.to(device)
    example = torch.randn(2, *shape, device=device)
    provs = providers(model, example, device)
    runnable = {k: v[0] for k, v in provs.items() if v[0] is not None}
    rows = []
    for batch in batches:
        if workload.startswith("resnet18") and batch > args.resnet_max_batch:
            log(f"  {workload} batch {batch}: skipped (> --resnet-max-batch {args.resnet_max_batch})")
            continue
        x = torch.randn(batch, *shape, device=device)
        with torch.no_grad():
            ref = model(x).float()
            diffs = {k: float((m(x.half() if k == "2:4" else x).float() - ref).abs().max()) for k, m in runnable.items()}
        reps = args.reps if not workload.startswith("resnet18") else max(3, args.reps // 4)
        samples = time_case(runnable, x, reps, device)
        med = {k: statistics.median(v) for k, v in samples.items()}
        base = dict(info, date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    loadavg_1m=loadavg(), device=device.type, workload=workload,
                    density=f"{dlabel if dlabel is not None else _density(model):.4f}", batch=batch)
        for name, (m, note) in provs.items():
            row = dict(base, provider=name, note=note)
            if m is None:
                rows.append(dict(row, status="skipped"))
                continue
            s = sorted(samples[name])
            row.update(params=sum(t.numel() for t in m.state_dict().values() if t.layout == torch.strided)
                       if name != "onednn" else "", median_ms=f"{med[name]:.4f}", p20_ms=f"{percentile(s, 0.2):.4f}",
                       p80_ms=f"{percentile(s, 0.8):.4f}", reps=len(s),
                       speedup_vs_dense=f"{med['dense'] / med[name]:.2f}",
                       speedup_vs_onednn=f"{med['onednn'] / med[name]:.2f}" if "onednn" in med else "",
                       max_abs_diff=f"{diffs[name]:.2e}", status="ok")
            rows.append(row)
            log(f"  {workload:8s} d={base['density']} b={batch:<4d} {name:14s} {med[name]:9.4f} ms "
                f"[{row['p20_ms']}, {row['p80_ms']}]  x{row['speedup_vs_dense']:>6s} vs dense"
                f"{'  x' + row['speedup_vs_onednn'] + ' vs onednn' if row['speedup_vs_onednn'] else ''}"
                f"  diff {row['max_abs_diff']}")
    return rows


@torch.no_grad()
def calibrate(args, info, log) -> list[dict]:
    """Break-even density of SparseLinear against dense F.linear and oneDNN, per batch size."""
    from torch.utils import mkldnn

    rows = []
    n = 4096 if not args.quick else 512
    for batch in args.batches:
        for d in (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3):
            lin = torch.nn.Linear(n, n).eval()
            sparsify_(lin, d, linear="elementwise", conv=None, generator=torch.Generator().manual_seed(0))
            models = {"dense": lin, "onednn": mkldnn.to_mkldnn(copy.deepcopy(lin)), "sparse": export.SparseLinear.from_linear(lin)}
            samples = {k: sorted(v) for k, v in time_case(models, torch.randn(batch, n), args.reps,
                                                          torch.device("cpu")).items()}
            med = {k: statistics.median(v) for k, v in samples.items()}
            for k in models:
                rows.append(dict(info, date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                 loadavg_1m=loadavg(), device="cpu", workload=f"calibrate-linear{n}",
                                 density=f"{d:.4f}", batch=batch, provider=k, median_ms=f"{med[k]:.4f}",
                                 p20_ms=f"{percentile(samples[k], 0.2):.4f}",
                                 p80_ms=f"{percentile(samples[k], 0.8):.4f}",
                                 reps=len(samples[k]),
                                 speedup_vs_dense=f"{med['dense'] / med[k]:.2f}",
                                 speedup_vs_onednn=f"{med['onednn'] / med[k]:.2f}", status="ok"))
            log(f"  linear {n}x{n} d={d:<5} b={batch:<4d} dense {med['dense']:8.3f} ms  onednn {med['onednn']:8.3f} ms"
                f"  csr {med['sparse']:8.3f} ms  csr/onednn {med['sparse'] / med['onednn']:.2f}")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    p.add_argument("--densities", default="0.01,0.02,0.05,0.1", help="densities of the mlp4096 workload")
    p.add_argument("--batches", default="1,32,256", help="batch sizes")
    p.add_argument("--reps", type=int, default=15, help="timed samples per provider (resnet18: a quarter)")
    p.add_argument("--resnet-max-batch", type=int, default=32, help="largest resnet18 batch (slow on a CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: ratios on a shared machine)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--checkpoint", default=None, help="digits: a run's --out-dir (default: train one now)")
    p.add_argument("--calibrate", action="store_true", help="only the break-even sweep of one Linear layer")
    p.add_argument("--quick", action="store_true", help="smoke run: mlp4096 at 2 %% and digits, batches 1,32, 3 reps")
    p.add_argument("--csv", default=None, help="CSV path (default benchmarks/results/<machine>-inference-<date>.csv, "
                                               "appended; --quick writes one only to an explicit --csv)")
    p.add_argument("--no-csv", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if args.quick:
        args.workloads, args.densities, args.batches, args.reps = "digits,mlp4096", "0.02", "1,32", 3
    args.workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workloads {bad}; expected a subset of {WORKLOADS}")
    args.densities = [float(d) for d in args.densities.split(",") if d]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    info.pop("triton_version", None)
    log = print
    log(f"{info['cpu_model']} ({info['cpu_cores']} cores), torch {info['torch_version']}, "
        f"{torch.get_num_threads()} thread(s), load {loadavg()}")
    rows = calibrate(args, info, log) if args.calibrate else []
    if not args.calibrate:
        for w in args.workloads:
            for d in (args.densities if w == "mlp4096" else [None]):
                rows += run_workload(w, d, args.batches, args, device, info, log)
    # a smoke run's rows must not land in the results of the day (they share its default file name)
    if args.no_csv or (args.quick and not args.csv):
        return rows
    date = _dt.datetime.now(_dt.timezone.utc).date().isoformat()  # UTC, as bench_step's file names
    path = args.csv or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{info['machine']}-inference-{date}.csv")
    write_csv(path, rows, CSV_COLUMNS)
    log(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
