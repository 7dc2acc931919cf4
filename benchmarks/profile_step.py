"""Where one provider's step spends its time: the host side (cProfile, top functions) and the GPU
side (torch.profiler: each kernel's count and total time). Complements bench_step.py, which only
says how long a step takes.

    python benchmarks/profile_step.py --provider triton --workload resnet18 --optimizer adabreg
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the same workloads and providers as bench_step.py
from cases import ALL_OPTIMIZERS, CHANNELS_LAST_WORKLOADS, DTYPES, REGS, WORKLOADS  # noqa: E402
from cases import make_reg, make_tensors, workload_shapes  # noqa: E402
from providers import ANCHOR_OPTIMIZER, PROVIDERS, build_provider  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="cuda", choices=PROVIDERS)
    ap.add_argument("--workload", default="resnet18", choices=WORKLOADS)
    ap.add_argument("--optimizer", default="adabreg", choices=ALL_OPTIMIZERS + tuple(ANCHOR_OPTIMIZER.values()),
                    help="one of ours for our providers; adam / sgd for torch-adam-fused / torch-sgd")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--reg", default="l1", choices=REGS)
    ap.add_argument("--steps", type=int, default=20, help="profiled steps (after 3 warm-up steps)")
    ap.add_argument("--top", type=int, default=25, help="rows of each table")
    args = ap.parse_args(argv)
    anchor_optimizer = ANCHOR_OPTIMIZER.get(args.provider)
    if anchor_optimizer is not None and args.optimizer != anchor_optimizer:
        ap.error(f"--provider {args.provider} times torch's {anchor_optimizer}: pass --optimizer {anchor_optimizer}")
    if anchor_optimizer is None and args.optimizer in ANCHOR_OPTIMIZER.values():
        ap.error(f"--optimizer {args.optimizer} is torch's: profile it with --provider "
                 f"{next(p for p, o in ANCHOR_OPTIMIZER.items() if o == args.optimizer)}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = workload_shapes(args.workload)
    params, grads = make_tensors(shapes, DTYPES[args.dtype], device,
                                 channels_last=args.workload in CHANNELS_LAST_WORKLOADS)
    step = build_provider(args.provider, args.optimizer, params, grads, make_reg(args.reg), args.reg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(4):
        step()
    sync()

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    prof.disable()
    sync()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"# host side of {args.steps} steps: {args.provider} {args.optimizer} {args.workload} {args.dtype} "
          f"({len(shapes)} tensors) on {device}")
    print(out.getvalue())

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as tp:
        for _ in range(args.steps):
            step()
        sync()
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# torch.profiler over {args.steps} steps, sorted by {sort}")
    print(tp.key_averages().table(sort_by=sort, row_limit=args.top))


if __name__ == "__main__":
    main()
