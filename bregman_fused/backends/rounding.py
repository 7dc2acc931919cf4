"""How the spec rounds: each op of reference.py and moments.py rounds once, correctly.

[note: spec roundings] The kernels evaluate csrc/bregman_math.h with IEEE operations and no
contraction (-ffp-contract=off, --fmad=false, Triton without fp fusion). The reference avoids
the torch ops that round differently:
- ops that fuse a multiply-add: lerp, add/sub with ``alpha``, addcmul, addcdiv. ATen's vectorized
  CPU loops contract these into an fma, their scalar tails do not, and inductor generates
  neither form;
- the float32 ``sqrt`` of ATen's CPU kernel. It is not correctly rounded: about 17 % of its
  results are one ulp off the IEEE square root that the kernels and inductor compute.
What is left (mul, div, add, sub, min/max, where, casts) rounds the same in every torch kernel
and in inductor's generated code. So the reference computes the kernels' bits for the
element-wise maps, and ``torch.compile`` of a reference step computes eager's bits.
Reductions differ: the row norms of the group maps sum in an order each kernel chooses (see
prox_maps.row_norms).
"""
from __future__ import annotations

import torch


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x, correctly rounded for float32 on every device.

    float32 goes through float64. The square root of a float lies at least about 2⁻⁵¹·√x from any
    midpoint between two floats (a midpoint M·2ᵉ has an odd 25-bit M, so M² ≠ x·2⁻²ᵉ and
    |√x − M·2ᵉ| ≥ 2ᵉ/(2M)). That is more than the float64 result's error (ATen's CPU float64 sqrt
    is within an ulp, ≤ 2⁻⁵²·√x), so rounding it to float32 gives the IEEE float32 square root.
    Other dtypes use torch's sqrt (float64 on the CPU can be an ulp off IEEE)."""
    if x.dtype == torch.float32:
        return x.double().sqrt_().float()
    return x.sqrt()


def lerp_(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """a ← a + w·(b − a) for a scalar weight, in torch's two-branch form (exact at w = 0 and w = 1),
    each op rounded once (bregman_math.h ``bf_lerp``)."""
    if w < 0.5:
        return a.add_((b - a).mul_(w))
    return a.copy_(b - (b - a).mul_(1.0 - w))
