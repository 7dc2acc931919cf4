"""Compact moments: how AdaBreg's m and s (and LinBreg's momentum buffer) are stored, the spec.

``moments="fp32"`` (the default) keeps them in the state dtype. The compact formats store them in
fewer bytes; the dual v, the master copy of θ, always stays in the state dtype (float32):

* ``"bf16"``: m and s in bfloat16, written with *stochastic rounding* [note: bf16 rounding].
* ``"8bit"``: one byte per element and one float32 scale per block of ``BLOCK`` elements
  [note: 8-bit code]. Params with fewer than ``MIN_8BIT_NUMEL`` elements, of fewer than 2 dims,
  with dim-0 rows shorter than ``MIN_8BIT_ROW`` elements, or not contiguous keep fp32 moments
  (``storage``), as bitsandbytes' ``min_8bit_size`` does for small tensors.

Every backend decodes the stored moments to float32, runs the fp32 update of contract.Hyper's kind
(the same op sequence as fp32 moments), uses the new fp32 m and s for this step's dual update,
and only then encodes them for storage: the rounding of a step only reaches the next step.

[note: bf16 rounding] Nearest rounding swallows every EMA increment below half a bf16 ulp (2⁻⁹
relative): s ← 0.999·s + 0.001·g² can never decay (0.999·s rounds back to s) and only grows when
g² > 3·s; m ← m + (1−β1)·(g − m) stalls once |g − m| < 2⁻⁹/(1−β1) of |m|.
benchmarks/bf16_rounding.py measures it on gradients that shrink 100× over 3,000 steps: with
nearest rounding √s ends 2.6–3× its fp32 value (median relative error 1.6–2.0), with stochastic
rounding 3–4 % off; m is within 0.2–1.3 % either way for β1 = 0.9 or noisy gradients, but with
β1 = 0.99 and steady gradients nearest rounding leaves m 25 % off (stochastic: 0.6 %). So both moments are rounded
stochastically (the digits runs cannot tell the two apart: 400 steps are too few for s to
drift). Stochastic rounding keeps each increment in expectation: the fp32 bits plus 16
random bits, truncated to the top 16 bits. The random bits are a hash of (the value's top 16
bits, i.e. the bf16 interval it lies in, the step count, which moment) (``random_bits``), so
every backend draws the same bits, a run is reproducible, and the draw depends neither on where
the element is stored (its index, the memory layout, the FSDP2 shard that holds it) nor on the
value's last bits: two runs whose values differ by an ulp before rounding (grads all-reduced in
another order, a user's own fused kernel) still round alike unless the ulp crosses the
threshold (a chance of 2⁻¹⁶), where a hash of all 32 bits would redraw the coin. The price: at
one step, the values in one bf16 interval share the draw (a threshold, as a dither shared by the
interval); each value is still rounded up with probability equal to its distance to the lower
neighbour over the steps. NaN becomes the canonical bf16 NaN (0x7FC0).

[note: 8-bit code] The blocks follow dim-0 rows, so that a row-wise shard (FSDP2's dim-0 shards)
never splits one: a row of L = numel/shape[0] elements holds ceil(L/BLOCK) blocks, the last one
shorter. The scales have shape (shape[0], ceil(L/BLOCK)) and shard with the param. Codes are a
non-linear "quadratic" map, closed-form both ways (no table lookup, no search):

    m (signed):   scale a = max|m| over the block;  code c = sign(m)·rint(127·√(|m|/a))  (int8)
                  decode m = sign(c)·c²·(a/127²)
    s (≥ 0):      the coded value is r = √s (Adam's own √s);  scale b = max r over the block;
                  code q = rint(255·√(r/b))  (uint8);  decode r = q²·(b/255²), s = r²

so the relative resolution is finest at the top of a block and values down to ~1.5e-5·a (m) and
~1.5e-11·b² (s) stay non-zero: s reaches zero only far below where m does, so m/(√s + ε) cannot
blow up from an s rounded to zero while m is not. Exactly: x/a is computed as x·(1/a), with 1/a
rounded once per block; a block whose scale is below the smallest normal float (so that 1/scale
is finite) or not finite stores code 0 everywhere (a NaN or inf scale makes every decoded value
NaN, as the fp32 moments would be).
"""
from __future__ import annotations

import math

import torch

from . import rounding

__all__ = ["FORMATS", "BLOCK", "MIN_8BIT_NUMEL", "MIN_8BIT_ROW", "storage", "format_of", "scale_shape", "check_moments",
           "decode_m", "decode_s", "encode_m", "encode_s", "to_storage", "random_bits", "round_bf16"]

FORMATS = ("fp32", "bf16", "8bit")
BLOCK = 256
# Below this many elements a param keeps fp32 moments with "8bit" (bitsandbytes' default
# min_8bit_size): the bytes saved are negligible and short rows waste scale bytes.
MIN_8BIT_NUMEL = 4096
# Nor do params whose dim-0 rows are shorter than this: every row has scales of its own (blocks
# never straddle rows, so never a shard), so one moment costs 1 + 4·⌈L/256⌉/L bytes per element
# for rows of L elements: at most 1.25 from L = 16 on, but 5 (more than fp32's 4) for L = 1.
MIN_8BIT_ROW = 16
Q_SIGNED = 127.0
Q_UNSIGNED = 255.0
SR_STREAM_M, SR_STREAM_S = 0, 1  # which moment a random bit stream belongs to

_MASK32 = 0xFFFFFFFF
_FLOAT_TINY = torch.finfo(torch.float32).tiny
_CANONICAL_NAN_BITS = 0x7FC0  # the bf16 NaN every backend writes (torch's CPU conversion gives 0xFFFF)


def check_moments(moments) -> str:
    if moments not in FORMATS:
        raise ValueError(f"Invalid moments: {moments!r}; expected one of {list(FORMATS)} (fp32 is the default)")
    return moments


def storage(p: torch.Tensor, moments: str) -> str:
    """The format a param's moments are stored in under the optimizer option ``moments``."""
    if moments == "8bit" and (p.dim() < 2 or p.numel() < MIN_8BIT_NUMEL or not p.is_contiguous()
                              or math.prod(p.shape[1:]) < MIN_8BIT_ROW):
        return "fp32"
    return moments


def format_of(m: torch.Tensor) -> str:
    """The format of a stored moment, from its dtype."""
    if m.dtype == torch.bfloat16:
        return "bf16"
    if m.dtype in (torch.int8, torch.uint8):
        return "8bit"
    return "fp32"


def scale_shape(shape) -> tuple[int, int]:
    """The shape of an 8-bit moment's block scales: (rows, blocks per row)."""
    rows = int(shape[0])
    row_len = math.prod(shape[1:])
    return rows, -(-row_len // BLOCK)


# ---- 8-bit blocks (tensors are contiguous: storage() gives 8-bit only to contiguous params) ------
def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x (contiguous) as (rows, blocks, BLOCK), the last block of each row padded with zeros."""
    rows, nb = scale_shape(x.shape)
    flat = x.reshape(rows, math.prod(x.shape[1:]))  # not -1: a shard may hold 0 rows (FSDP2, few rows)
    pad = nb * BLOCK - flat.shape[1]
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(rows, nb, BLOCK)


def _unblocks(x: torch.Tensor, shape) -> torch.Tensor:
    rows, nb = scale_shape(shape)
    return x.reshape(rows, nb * BLOCK)[:, :math.prod(shape[1:])].reshape(shape)


def decode_m(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """m = sign(c)·c²·(a/127²), float32."""
    f = _blocks(codes).to(torch.float32)
    step = rounding.div(scale, Q_SIGNED**2).unsqueeze(-1)
    return _unblocks((f * f.abs()) * step, codes.shape)


def decode_s(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s = r² with r = q²·(b/255²), float32."""
    f = _blocks(codes).to(torch.float32)
    r = (f * f) * rounding.div(scale, Q_UNSIGNED**2).unsqueeze(-1)
    return _unblocks(r * r, codes.shape)


def _encode(x_abs: torch.Tensor, q_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float (rows, blocks, BLOCK), scales): rint(q_max·√(x·(1/scale))), the scale the
    block's max (NaN-propagating); code 0 where the scale is 0 or not finite."""
    blocks = _blocks(x_abs)
    scale = blocks.amax(dim=-1)
    usable = torch.isfinite(scale) & (scale >= _FLOAT_TINY)  # 1/scale finite
    inv = torch.where(usable, 1.0 / torch.where(usable, scale, 1.0), 0.0).unsqueeze(-1)
    q = torch.clamp(torch.round(rounding.sqrt(blocks * inv) * q_max), max=q_max)
    return torch.where(usable.unsqueeze(-1), q, 0.0), scale


def encode_m(m: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Write float32 m as int8 codes and block scales (in place)."""
    q, a = _encode(m.abs(), Q_SIGNED)
    signed = torch.where(_blocks(m) < 0, -q, q)
    codes.copy_(_unblocks(signed, m.shape).to(torch.int8))
    scale.copy_(a)


def encode_s(r: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Write r = √s (float32) as uint8 codes and block scales (in place)."""
    q, b = _encode(r, Q_UNSIGNED)
    codes.copy_(_unblocks(q, r.shape).to(torch.uint8))
    scale.copy_(b)


# ---- bf16 stochastic rounding ----------------------------------------------------------------
def random_bits(key: torch.Tensor, step: int | torch.Tensor, stream: int) -> torch.Tensor:
    """16 random bits per element (int64 in [0, 2¹⁶)): a 32-bit integer hash of the key (the top 16
    bits of the float to round, as int64), the step count and the moment
    (csrc/moment_codes.h ``random_bits``; every backend computes the same bits). The mix is
    murmur3's 32-bit finalizer."""
    x = (((key & _MASK32) * 0x9E3779B1) ^ ((step * 0x85EBCA77) & _MASK32) ^ (stream * 0xC2B2AE3D)) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    x = x ^ (x >> 16)
    return x >> 16


def round_bf16(x: torch.Tensor, step: int | torch.Tensor, stream: int) -> torch.Tensor:
    """float32 x stochastically rounded to bfloat16: (bits(x) + 16 random bits) >> 16, the random
    bits keyed by the top 16 bits of x; NaN becomes the canonical NaN (0x7FC0)."""
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    noisy = ((bits + random_bits(bits >> 16, step, stream)) & _MASK32) >> 16
    noisy = torch.where(noisy >= 0x8000, noisy - 0x10000, noisy).to(torch.int16)  # two's complement view
    return torch.where(torch.isnan(x), _CANONICAL_NAN_BITS, noisy).view(torch.bfloat16)


# ---- conversions between formats (checkpoints) ------------------------------------------------
def to_storage(m: torch.Tensor, fmt: str, signed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored moment, block scale or None) of a float moment ``m`` in format ``fmt``, rounded to
    nearest: the one-time conversion of a loaded checkpoint (a step's writes round as above).
    ``signed``: m (or a momentum buffer); else s."""
    if fmt == "fp32":
        return m.clone(), None
    m = m.to(torch.float32)
    if fmt == "bf16":
        return m.to(torch.bfloat16), None
    m = m.contiguous()
    codes = torch.empty_like(m, dtype=torch.int8 if signed else torch.uint8)
    scale = torch.empty(scale_shape(m.shape), dtype=torch.float32, device=m.device)
    if signed:
        encode_m(m, codes, scale)
    else:
        encode_s(rounding.sqrt(m.clamp(min=0)), codes, scale)
    return codes, scale


def to_float(stored: torch.Tensor, scale: torch.Tensor | None, signed: bool) -> torch.Tensor:
    """A stored moment of any format, decoded to float32."""
    if format_of(stored) == "8bit":
        return decode_m(stored, scale) if signed else decode_s(stored, scale)
    return stored.to(torch.float32)
