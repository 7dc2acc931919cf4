"""Compact moments in the Triton kernels (moments="bf16" | "8bit"): the per-element codes.

The spec is backends/moments.py (its notes [note: bf16 rounding] and [note: 8-bit code]);
csrc/moment_codes.h is the same math in C++. Each formula is written once, here: kernels.py reads
and writes bf16 moments with it inside the fp32 kernels, moment_kernels.py codes the 8-bit blocks.
A step decodes the stored moments to float32, runs the float32 update of bregman_math.py (the same
as for fp32 moments), uses the new float32 m and s for the dual, and only then encodes them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import moments
from .bregman_math import _div, _sqrt

# The format of a call's moments, a compile-time constant of the kernels (launcher: FORMAT_CODES;
# fp32 is 0, which no kernel tests for: every format runs the same float update).
MOMENTS_BF16 = tl.constexpr(1)
MOMENTS_8BIT = tl.constexpr(2)
FORMAT_CODES = {"fp32": 0, "bf16": 1, "8bit": 2}
assert tuple(FORMAT_CODES) == moments.FORMATS

CODE_BLOCK = tl.constexpr(moments.BLOCK)  # elements per 8-bit block (one scale each)
Q_SIGNED = tl.constexpr(moments.Q_SIGNED)
Q_UNSIGNED = tl.constexpr(moments.Q_UNSIGNED)
STREAM_M = tl.constexpr(moments.SR_STREAM_M)  # the random bit stream of m / the momentum buffer
STREAM_S = tl.constexpr(moments.SR_STREAM_S)
_FLOAT_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
_FLOAT_MAX = tl.constexpr(torch.finfo(torch.float32).max)
_BF16_NAN = tl.constexpr(0x7FC0)  # the canonical bf16 NaN, what nearest rounding gives
# 2²³: float32 values in [2²³, 2²⁴) are the integers, so (y + 2²³) − 2²³ is y rounded to the
# nearest integer, ties to even, for 0 ≤ y < 2²³ (rint). libdevice's rint has no interpreter
# version; two float32 adds are exact in both (the kernels compile without fp fusion or fast math).
_RINT_MAGIC = tl.constexpr(8388608.0)


# ---- bf16 stochastic rounding [note: bf16 rounding] ------------------------------------------
@triton.jit
def random_bits(key, step, STREAM: tl.constexpr):
    """16 random bits (uint32 in [0, 2¹⁶)) of (key, step count, stream), the key being the top 16
    bits of the float to round: moments.random_bits, murmur3's 32-bit finalizer. uint32 throughout:
    multiplies wrap and the shifts are logical, as in the spec's ``& 0xFFFFFFFF`` arithmetic."""
    x = (key.to(tl.uint32) * 0x9E3779B1) ^ (step.to(tl.uint32) * 0x85EBCA77)
    if STREAM != 0:
        x = x ^ ((STREAM * 0xC2B2AE3D) & 0xFFFFFFFF)
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    return x >> 16


@triton.jit
def bf16_decode(bits):
    """A bf16 moment (its 16 bits, uint16) widened to float32."""
    return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def bf16_round(x, step, STREAM: tl.constexpr):
    """float32 x stochastically rounded to bf16, as its 16 bits (uint16): (bits(x) + 16 random
    bits) >> 16; NaN gives the canonical NaN (the carry could turn a NaN's payload into ±inf)."""
    bits = x.to(tl.uint32, bitcast=True)
    top = ((bits + random_bits(bits >> 16, step, STREAM)) >> 16).to(tl.uint16)
    return tl.where(x != x, tl.full(x.shape, _BF16_NAN, tl.uint16), top)


# ---- 8-bit block codes [note: 8-bit code] ------------------------------------------------------
@triton.jit
def decode_step(scale, Q: tl.constexpr):
    """A block's decode step scale/Q² (correctly rounded, as the spec's float32 division)."""
    return _div(scale, tl.full(scale.shape, Q * Q, tl.float32))


@triton.jit
def decode_m(codes, step):
    """m = (c·|c|)·(a/127²) from int8 codes c."""
    f = codes.to(tl.float32)
    return (f * tl.abs(f)) * step


@triton.jit
def decode_s(codes, step):
    """s = r² with r = (q·q)·(b/255²) from uint8 codes q."""
    f = codes.to(tl.float32)
    r = (f * f) * step
    return r * r


@triton.jit
def block_scale(x_abs, mask):
    """The scale of each block (row of an [NB, CODE_BLOCK] tile): the max of |x| over its live
    lanes, NaN if any is NaN (torch.amax). tl.max's NaN handling is the target's, hence the flag."""
    a = tl.where(mask, x_abs, 0.0)
    has_nan = tl.max((a != a).to(tl.int32), axis=1) > 0
    return tl.where(has_nan, float("nan"), tl.max(a, axis=1))


@triton.jit
def encode_factor(scale):
    """1/scale (correctly rounded) where the scale is finite and at least the smallest normal
    float (1/scale finite), else 0: such a block stores code 0 everywhere."""
    usable = (scale >= _FLOAT_TINY) & (scale <= _FLOAT_MAX)  # NaN fails both
    return tl.where(usable, _div(tl.full(scale.shape, 1.0, tl.float32), tl.where(usable, scale, 1.0)), 0.0)


@triton.jit
def _code_magnitude(x, inv, Q: tl.constexpr):
    """min(rint(Q·√(x·inv)), Q) for x ≥ 0 (|m| or r = √s); 0 where inv is 0 (NaN x included)."""
    y = _sqrt(x * inv) * Q
    c = (y + _RINT_MAGIC) - _RINT_MAGIC  # rint (half to even): see _RINT_MAGIC
    return tl.where(inv > 0.0, tl.minimum(c, Q), 0.0)


@triton.jit
def encode_m(m, inv):
    """int8 code of m: sign(m)·rint(127·√(|m|·inv))."""
    c = _code_magnitude(tl.abs(m), inv, Q_SIGNED)
    return tl.where(m < 0.0, -c, c).to(tl.int8)


@triton.jit
def encode_s(r, inv):
    """uint8 code of r = √s: rint(255·√(r·inv))."""
    return _code_magnitude(r, inv, Q_UNSIGNED).to(tl.uint8)
