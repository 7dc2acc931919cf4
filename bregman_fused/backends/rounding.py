"""How the spec rounds: each op of reference.py and moments.py rounds once, correctly.

[note: spec roundings] The kernels evaluate csrc/bregman_math.h with IEEE operations and no
contraction (-ffp-contract=off, --fmad=false, Triton without fp fusion). The reference avoids
the torch ops that round differently:
- ops that fuse a multiply-add: lerp, add/sub with ``alpha``, addcmul, addcdiv. ATen's vectorized
  CPU loops contract these into an fma, their scalar tails do not, and inductor generates
  neither form;
- the float32 ``sqrt`` of ATen's CPU kernel. It is not correctly rounded: about 17 % of its
  results are one ulp off the IEEE square root that the kernels and inductor compute.
- division by a Python number: torch's CUDA kernels multiply by the number's reciprocal (one
  bit can be lost), and ``number / tensor`` is ``tensor.reciprocal() * number`` on every device.
  The spec divides by a 0-d tensor on the operand's device instead (``div``), which every
  device divides, rounding once (scalar_tensors.py [note: numbers as tensors]).
What is left (mul, div of tensors, add, sub, min/max, where, casts) rounds the same in every torch
kernel and in inductor's generated code. So the reference computes the kernels' bits for the
element-wise maps, and ``torch.compile`` of a reference step computes eager's bits.
Reductions differ: the row norms of the group maps sum in an order each kernel chooses (see
prox_maps.row_norms).
"""
from __future__ import annotations

import math

import torch

from ..scalar_tensors import scalar_like


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
    each op rounded once (bregman_math.h ``bf_lerp``). As torch.lerp, the weight is first rounded
    to a's dtype, and the branch and 1 − w are taken from that rounded weight: a float32 weight
    of 1 − β1 = 0.9 gives 1 − w = 0.100000024, not float32(0.1); and β1 = 0.50000001 takes the
    second branch, since 1 − β1 rounds to 0.5. 1 − w is exact for w in [0.5, 1]."""
    if a.dtype != torch.float64:
        w = to_float32(w)
    if w < 0.5:
        return a.add_((b - a).mul_(w))
    return a.copy_(b - (b - a).mul_(1.0 - w))


def to_float32(x: float) -> float:
    """x rounded to the nearest float32, ties to even, for x in float32's normal range (the
    lerp weight 1 − β1 ≥ 2⁻⁵³): in Python, so that torch.compile folds it as a constant."""
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * 2.0**24) / 2.0**24, exponent)


def div(x: torch.Tensor, b: float) -> torch.Tensor:
    """x / b rounded once on every device (the kernels' division): b as a 0-d tensor of x's dtype on
    x's device, since torch's CUDA kernels multiply by a host number's reciprocal instead."""
    return x / scalar_like(x, b)
