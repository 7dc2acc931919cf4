"""Training quality of compact moments (moments="bf16" | "8bit") against fp32 moments.

Runs the training CLI (python -m bregman_fused.train) once per (moments format, seed) and prints
a markdown table of the final test accuracy and density, with the differences to fp32 moments of
the same seed, and writes the rows to a CSV.

    python benchmarks/moments_quality.py                      # digits: AdaBreg, λ 0.1, 1 % init, 40 epochs, 3 seeds
    python benchmarks/moments_quality.py --study convnet-fake # ConvNet on FakeData, 20 epochs (divergence check)

The targets (issue 17): test accuracy within 0.5 point and final density within ±25 % (relative)
of fp32 moments, for both compact formats.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FORMATS = ("fp32", "bf16", "8bit")
STUDIES = {
    # the digits setting: the paper's AdaBreg (lr 1e-3, L1 λ 0.1, 1 % init) on the offline data
    "digits": ["--preset", "digits", "--optim", "adabreg", "--lr", "1e-3", "--lamda", "0.1", "--density", "0.01",
               "--epochs", "40"],
    # LinBreg with momentum on the same data (the momentum buffer is the compact state)
    "digits-linbreg-momentum": ["--preset", "digits", "--optim", "linbreg", "--momentum", "0.9", "--epochs", "40"],
    # a ConvNet (conv 64-64 5x5, FC 1024-128-10) on 2,000 FakeData images (random labels), dense and
    # unregularized (AdaBreg with NoReg, δ = 1: Adam) so that it memorizes: does anything diverge?
    "convnet-fake": ["--preset", "convnet-mnist5k", "--optim", "adam", "--fake-data", "2000", "--epochs", "20"],
}


def run(study: str, fmt: str, seed: int, backend: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bregman_fused.train", *STUDIES[study], "--moments", fmt, "--seed", str(seed),
           "--backend", backend, "--out-dir", str(out), "--overwrite", "--no-plot", "--no-progress", "--quiet"]
    subprocess.run(cmd, check=True)
    history = json.loads((out / "history.json").read_text())["history"]
    last = history[-1]
    losses = [row["train_loss"] for row in history]
    return {"study": study, "moments": fmt, "seed": seed, "epochs": last["epoch"], "test_acc": last["test_acc"],
            "density": last["density"], "final_train_loss": last["train_loss"], "max_train_loss": max(losses),
            "finite": all(math.isfinite(x) for x in losses)}


def table(rows: list[dict]) -> str:
    by = {(r["moments"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out = ["| moments | seed | test acc | Δ acc (points) | density | density / fp32 | final train loss | finite |",
           "|---|---|---|---|---|---|---|---|"]
    for fmt in FORMATS:
        for seed in seeds:
            r, base = by.get((fmt, seed)), by.get(("fp32", seed))
            if r is None:
                continue
            d_acc = 100 * (r["test_acc"] - base["test_acc"]) if base else float("nan")
            ratio = r["density"] / base["density"] if base and base["density"] else float("nan")
            out.append(f"| {fmt} | {seed} | {100 * r['test_acc']:.2f} % | {d_acc:+.2f} | {r['density']:.4f} | "
                       f"{ratio:.3f} | {r['final_train_loss']:.4f} | {r['finite']} |")
    for fmt in FORMATS[1:]:
        mine = [by[(fmt, s)] for s in seeds if (fmt, s) in by and ("fp32", s) in by]
        if not mine:
            continue
        acc = [100 * (r["test_acc"] - by[("fp32", r["seed"])]["test_acc"]) for r in mine]
        dens = [r["density"] / by[("fp32", r["seed"])]["density"] for r in mine]
        out.append(f"| **{fmt} mean** | {len(mine)} seeds | | {statistics.mean(acc):+.2f} (max |Δ| "
                   f"{max(map(abs, acc)):.2f}) | | {statistics.mean(dens):.3f} ({min(dens):.3f}–{max(dens):.3f}) | | |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=tuple(STUDIES), default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--backend", default="auto")
    p.add_argument("--csv", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for fmt in args.formats:
                rows.append(run(args.study, fmt, seed, args.backend, Path(tmp) / f"{fmt}-{seed}"))
                print(f"{args.study} {fmt} seed {seed}: test acc {rows[-1]['test_acc']:.4f} density "
                      f"{rows[-1]['density']:.4f}", file=sys.stderr)
    print(table(rows))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
