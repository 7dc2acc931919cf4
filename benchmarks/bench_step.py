#!/usr/bin/env python
"""Optimizer-step benchmark: time per step, effective GB/s, % of copy bandwidth, speed-up.

Every provider updates its own copy of the same parameters with the same gradients; providers of
one (workload, dtype, optimizer) case are measured interleaved (one step each, round-robin, the
order rotated every repetition) so that drifting clocks or a noisy neighbour hit them alike.

    python benchmarks/bench_step.py                      # everything that can run here
    python benchmarks/bench_step.py --quick              # CI-size smoke run (tiny workload)
    python benchmarks/bench_step.py --workloads resnet18 --dtypes fp32 \
        --providers research-loop,reference,cpu,torch-adam-fused,copy

Byte counts are the floors of docs/design.md §2 (the traffic a perfect fused kernel moves), so
"GB/s" is effective bandwidth: bytes/elt × numel / median time. See benchmarks/README.md, which also
names the modules this command is made of (cases, providers, research_loop, timing, report).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os

import torch

from cases import ALL_OPTIMIZERS, DEFAULT_WORKLOADS, DTYPES, GPU_WORKLOADS, OPTIMIZERS, REGS, WORKLOADS
from providers import ANCHOR_OPTIMIZER, ANCHOR_PROVIDERS, GPU_PROVIDERS, OUR_PROVIDERS, PEER, PROVIDERS, peer_anchor
from report import format_row, loadavg, machine_info, table_header, write_csv
from timing import run_anchor_case, run_case


def _csv_list(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)} (comma-separated) or 'all'")
        return items

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", type=_csv_list(PROVIDERS), default=None,
                    help=f"comma-separated subset of {', '.join(PROVIDERS)} (default: all)")
    ap.add_argument("--workloads", type=_csv_list(WORKLOADS), default=None,
                    help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: {', '.join(DEFAULT_WORKLOADS)}; "
                         "list-100m only on GPU)")
    ap.add_argument("--dtypes", type=_csv_list(tuple(DTYPES)), default=None, help="fp32,bf16 (default: both)")
    ap.add_argument("--optimizers", type=_csv_list(ALL_OPTIMIZERS), default=None,
                    help=f"comma-separated subset of {', '.join(ALL_OPTIMIZERS)} (default: {', '.join(OPTIMIZERS)}; "
                         "the -bf16 / -8bit ones store their moments compactly)")
    ap.add_argument("--reg", choices=REGS, default="l1", help="regularizer of our optimizers (default: l1)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the tensors live (default: cuda if available, else cpu)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per provider (default 30; --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 3; --quick 1)")
    ap.add_argument("--min-reps", type=int, default=5, help="never stop a case before this many reps (default 5)")
    ap.add_argument("--max-time", type=float, default=120.0,
                    help="stop a case's timed loop after this many seconds once --min-reps are done (default 120)")
    ap.add_argument("--compile-max-tensors", type=int, default=256,
                    help="skip compiled-reference on workloads with more tensors than this (default 256)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's default). On a shared, busy CPU "
                         "use 1: with every core taken, each parallel region waits for a descheduled thread")
    ap.add_argument("--csv", default=None, help="CSV path (default: benchmarks/results/<machine>-<date>.csv; rows are "
                                                "appended; --quick writes one only to an explicit --csv)")
    ap.add_argument("--no-csv", action="store_true", help="print the table only")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke preset: workload tiny, fp32, 5 reps, 1 warm-up, all providers except "
                         "compiled-reference (explicit options still win); no CSV unless --csv is given, since "
                         "smoke numbers are no results")
    args = ap.parse_args(argv)
    if args.quick:
        args.workloads = args.workloads or ["tiny"]
        args.dtypes = args.dtypes or ["fp32"]
        args.providers = args.providers or [p for p in PROVIDERS if p != "compiled-reference"]
        args.reps = args.reps if args.reps is not None else 5
        args.warmup = args.warmup if args.warmup is not None else 1
        args.min_reps = min(args.min_reps, args.reps)
    args.providers = args.providers or list(PROVIDERS)
    args.workloads = args.workloads or list(DEFAULT_WORKLOADS)
    args.dtypes = args.dtypes or list(DTYPES)
    args.optimizers = args.optimizers or list(OPTIMIZERS)
    args.reps = args.reps if args.reps is not None else 30
    args.warmup = args.warmup if args.warmup is not None else 3
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(device)

    def log(msg: str) -> None:
        print(msg, flush=True)

    providers = list(args.providers)
    workloads = list(args.workloads)
    if device.type != "cuda":
        gpu_p = [p for p in providers if p in GPU_PROVIDERS]
        gpu_w = [w for w in workloads if w in GPU_WORKLOADS]
        why = "no CUDA device here (torch.cuda.is_available() is False)" if not torch.cuda.is_available() \
            else "this run is on --device cpu"
        if gpu_p:
            log(f"GPU providers skipped ({', '.join(gpu_p)}): {why}")
        if gpu_w:
            log(f"GPU workloads skipped ({', '.join(gpu_w)}): {why}")
        providers = [p for p in providers if p not in GPU_PROVIDERS]
        workloads = [w for w in workloads if w not in GPU_WORKLOADS]
    ours = [p for p in providers if p in OUR_PROVIDERS or p == "copy"]
    if not any(p in OUR_PROVIDERS for p in providers):
        ours = []
    anchors = [p for p in providers if p in ANCHOR_PROVIDERS]

    log(f"# {info['cpu_model']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
        + (f", {info['gpu_name']}" if info["gpu_name"] else "")
        + f"; torch {info['torch_version']}, triton {info['triton_version'] or '-'}; device {device}; reg {args.reg}; "
          f"reps {args.reps}, warm-up {args.warmup}")
    if device.type == "cuda":
        log("# median/p20/p80 ms: wall time of a synchronized step (host + GPU); device ms: the GPU's time with the "
            "host's work hidden (GB/s, % copy and the ratios use it); host ms: the host's time to issue the step")
    load, cores = loadavg(), os.cpu_count() or 1
    if device.type == "cpu" and load and float(load) > cores and torch.get_num_threads() > 1:
        log(f"# WARNING: load average {load} on {cores} cores: multi-threaded CPU timings will be distorted "
            "(other processes hold the cores); consider --threads 1")
    log(table_header())
    all_rows: list[dict] = []
    # a smoke run's rows must not land in the results of the day (they share its default file name)
    csv_path = None if args.no_csv or (args.quick and not args.csv) else (args.csv or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"{info['machine']}-{_dt.datetime.now(_dt.timezone.utc).date().isoformat()}.csv"))

    def emit(rows: list[dict]) -> None:
        # rows go to the CSV case by case: an interrupted run keeps what it measured
        for r in rows:
            log(format_row(r))
        if csv_path:
            write_csv(csv_path, rows)
        all_rows.extend(rows)

    for workload in workloads:
        for dtype_name in args.dtypes:
            research_medians: dict[str, float] = {}
            timed_beside: set[str] = set()
            if ours:
                for kind in args.optimizers:
                    # the peer anchor (torch Adam for AdaBreg, SGD for LinBreg) joins the round-robin:
                    # ratios to it are measured side by side, under the same machine conditions
                    peer = peer_anchor(kind)
                    beside = [peer] if peer in anchors else []
                    timed_beside.update(beside)
                    rows = run_case(workload, dtype_name, kind, ours + beside, args, device, info, log)
                    for r in rows:
                        if r["provider"] == "research-loop" and "_median" in r:
                            research_medians[kind] = r["_wall"]
                    emit(rows)
                    gc.collect()
            for provider in (p for p in anchors if p not in timed_beside):
                kind = ANCHOR_OPTIMIZER[provider]
                rows = run_anchor_case(workload, dtype_name, provider, args, device, info, log,
                                       research_medians.get(PEER[kind]))
                emit(rows)
                gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if csv_path:
        log(f"# {len(all_rows)} rows -> {csv_path}")
    return all_rows


if __name__ == "__main__":
    main()
