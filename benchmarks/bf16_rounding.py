"""Why bf16 moments are written with stochastic rounding (backends/moments.py [note: bf16 rounding]).

Two measurements, each with fp32 moments as the baseline:

1. The Adam EMAs alone (β2 = 0.999; β1 = 0.9 and 0.99), on a noisy (noise 1) and a nearly constant (noise 0.01) gradient stream whose
   scale decays 100× over 3,000 steps (a training run's gradients shrink): s ← β2·s + (1−β2)·g² and m ← β1·m + (1−β1)·g kept in fp32, in bf16 with
   round-to-nearest, and in bf16 with stochastic rounding. Reported: the median relative error of
   √s and of m against fp32 at the end, over 4,096 elements.
2. The digits training of benchmarks/moments_quality.py (AdaBreg, λ 0.1, 1 % init, 40 epochs) with
   bf16 moments written by each rounding (the spec's stochastic rounding, and nearest by swapping
   ``moments.round_bf16`` in this process): test accuracy and density per seed.

    python benchmarks/bf16_rounding.py [--seeds 0 1 2] [--no-training]
"""
from __future__ import annotations

import argparse

import torch

from bregman_fused.backends import moments

BETA1, BETA2 = 0.9, 0.999


def ema_errors(noise: float, beta1: float = BETA1, steps: int = 3000, n: int = 4096,
               seed: int = 0) -> dict[str, tuple[float, float]]:
    """Median relative errors (√s, m) at the end of ``steps`` steps of g = scale·(0.3 + noise·N(0, 1)),
    the scale shrinking 100× over the run."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, steps)
    fp32 = [torch.zeros(n), torch.zeros(n)]
    nearest = [torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)]
    stochastic = [torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)]
    for t in range(steps):
        g = (0.3 + noise * torch.randn(n, generator=gen)) * scale[t]
        fp32[0].lerp_(g, 1 - beta1)
        fp32[1].mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        for store, rounding in ((nearest, None), (stochastic, t + 1)):
            m, s = store[0].float().lerp_(g, 1 - beta1), store[1].float().mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
            if rounding is None:
                store[0], store[1] = m.to(torch.bfloat16), s.to(torch.bfloat16)
            else:
                store[0] = moments.round_bf16(m, rounding, moments.SR_STREAM_M)
                store[1] = moments.round_bf16(s, rounding, moments.SR_STREAM_S)

    def rel(a, ref):
        return ((a.float() - ref).abs() / ref.abs().clamp_min(1e-30)).median().item()

    return {name: (rel(st[1].float().sqrt(), fp32[1].sqrt()), rel(st[0], fp32[0]))
            for name, st in (("nearest", nearest), ("stochastic", stochastic))}


def training(seeds: list[int]) -> list[tuple[str, int, float, float]]:
    from bregman_fused import train

    args = ["--preset", "digits", "--optim", "adabreg", "--lr", "1e-3", "--lamda", "0.1", "--density", "0.01",
            "--epochs", "40", "--backend", "reference", "--no-plot", "--no-progress", "--quiet"]
    stochastic = moments.round_bf16
    rows = []
    for rounding in ("fp32", "stochastic", "nearest"):
        moments.round_bf16 = stochastic if rounding != "nearest" else (lambda x, step, stream: x.to(torch.bfloat16))
        try:
            for seed in seeds:
                fmt = "fp32" if rounding == "fp32" else "bf16"
                history = train.train(train.parse_args(args + ["--moments", fmt, "--seed", str(seed)]))
                rows.append((rounding, seed, history[-1]["test_acc"], history[-1]["density"]))
        finally:
            moments.round_bf16 = stochastic
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-training", action="store_true")
    args = p.parse_args(argv)
    print("| β1 | gradient noise | bf16 rounding | median rel. error of √s | median rel. error of m |\n"
          "|---|---|---|---|---|")
    for beta1 in (0.9, 0.99):
        for noise in (1.0, 0.01):
            for name, (err_s, err_m) in ema_errors(noise, beta1).items():
                print(f"| {beta1:g} | {noise:g} | {name} | {err_s:.3g} | {err_m:.3g} |")
    if not args.no_training:
        print("\n| moments | seed | test acc | density |\n|---|---|---|---|")
        for rounding, seed, acc, density in training(args.seeds):
            print(f"| {rounding} | {seed} | {100 * acc:.2f} % | {density:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
