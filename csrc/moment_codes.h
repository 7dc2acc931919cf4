// Compact moments (moments="bf16" | "8bit"): the per-element encode/decode math, written once for
// the CPU kernels (scalar tail; the SIMD body uses the same formulas on vectors) and the CUDA kernels.
//
// The spec is bregman_fused/backends/moments.py; see its notes [note: bf16 rounding] and
// [note: 8-bit code]. Every step decodes the stored moments to float, runs the float update of
// bregman_math.h, uses the new float m and s for the dual, and encodes them for storage.
//
// bf16: stochastic rounding, bits(x) + 16 random bits truncated to the top 16 bits; the random
// bits are random_bits(the value's top 16 bits, step count, stream). NaN stays the canonical NaN.
//
// 8-bit: blocks of kMomentBlock elements along each dim-0 row (the last block of a row shorter),
// one float scale per block. m: scale a = max|m|, code c = sign(m)·rint(127·√(|m|·(1/a))) (int8),
// decode sign(c)·c²·(a/127²). s: coded as r = √s; scale b = max r, code q = rint(255·√(r·(1/b)))
// (uint8), decode r = q²·(b/255²), s = r². A block whose scale is below the smallest normal float or not finite
// stores code 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bregman_math.h"

namespace bregman {

constexpr const char* moments_name(Moments m) {
  switch (m) {
    case Moments::Fp32: return "fp32";
    case Moments::Bf16: return "bf16";
    case Moments::Int8: return "8bit";
  }
  return "?";
}

constexpr int64_t kMomentBlock = 256;      // moments.BLOCK
constexpr float kQSigned = 127.0f;         // moments.Q_SIGNED
constexpr float kQUnsigned = 255.0f;       // moments.Q_UNSIGNED
constexpr uint32_t kStreamM = 0;           // moments.SR_STREAM_M
constexpr uint32_t kStreamS = 1;           // moments.SR_STREAM_S

// ---- bf16 stochastic rounding ------------------------------------------------------------------
// 16 random bits of (key, step, stream): murmur3's 32-bit finalizer over a mix of the three
// (moments.random_bits); the key is the top 16 bits of the float being rounded. All arithmetic is
// on uint32, wrapping, as in every backend.
// The hash's multipliers (moments.random_bits), named once for the scalar and the SIMD versions:
// the key, step and stream spreads, then murmur3's two finalizer constants.
constexpr uint32_t kHashKey = 0x9E3779B1u, kHashStep = 0x85EBCA77u, kHashStream = 0xC2B2AE3Du;
constexpr uint32_t kFmix1 = 0x85EBCA6Bu, kFmix2 = 0xC2B2AE35u;

BF_HD uint32_t random_bits(uint32_t key, uint32_t step, uint32_t stream) {
  uint32_t x = (key * kHashKey) ^ (step * kHashStep) ^ (stream * kHashStream);
  x ^= x >> 16;
  x *= kFmix1;
  x ^= x >> 13;
  x *= kFmix2;
  x ^= x >> 16;
  return x >> 16;
}

// The bf16 bits of float x stochastically rounded with 16 random bits `r`; NaN → 0x7FC0.
BF_HD uint16_t round_bf16_bits(float x, uint32_t r) {
  if (x != x) return 0x7FC0;
  uint32_t bits;
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)  // device pass: the intrinsic (host: memcpy)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return static_cast<uint16_t>((bits + r) >> 16);
}

// float x stochastically rounded to bf16 bits with the spec's random bits (moments.round_bf16): the
// key of the hash is x's top 16 bits, so the draw depends neither on the element's position (shard,
// memory layout) nor on x's last bits (moments.py [note: bf16 rounding]).
BF_HD uint16_t round_bf16_sr(float x, uint32_t step, uint32_t stream) {
  uint32_t bits;
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return round_bf16_bits(x, random_bits(bits >> 16, step, stream));
}

BF_HD float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// ---- 8-bit block codes -------------------------------------------------------------------------
// Per-block constants from its scale: the decode step (scale/Q²) and the encode factor 1/scale
// (0 for a block that stores code 0: scale 0 or not finite).
struct BlockCode {
  float step;  // decode: value = c²·step (m: with c's sign; s: r = q²·step, s = r²)
  float inv;   // encode: code = rint(Q·√(x·inv))
};

// finite and at least the smallest normal float, so that 1/scale is finite
BF_HD bool usable_scale(float scale) { return scale >= 1.175494351e-38f && scale <= 3.402823466e38f; }

BF_HD BlockCode block_code(float scale, float q) {
  BlockCode c;
  c.step = scale / (q * q);
  c.inv = usable_scale(scale) ? 1.0f / scale : 0.0f;
  return c;
}

BF_HD float decode_m(int8_t c, float step) {
  const float f = static_cast<float>(c);
  return (f * (f < 0.0f ? -f : f)) * step;
}

BF_HD float decode_s(uint8_t q, float step) {
  const float f = static_cast<float>(q);
  const float r = (f * f) * step;
  return r * r;
}

// rint(Q·√(x·inv)) clamped to Q, for x ≥ 0 (|m| or √s); 0 when inv is 0 (unusable block). NaN x
// (only in a block whose scale is NaN, where inv is 0) gives 0 too.
BF_HD float code_magnitude(float x, float inv, float q) {
  const float y = x * inv;
  const float c = ::rintf(bf_sqrt(y) * q);
  return inv > 0.0f && c == c ? (c < q ? c : q) : 0.0f;
}

BF_HD int8_t encode_m(float m, float inv) {
  const float c = code_magnitude(m < 0.0f ? -m : m, inv, kQSigned);
  return static_cast<int8_t>(m < 0.0f ? -c : c);
}

BF_HD uint8_t encode_s(float r, float inv) { return static_cast<uint8_t>(code_magnitude(r, inv, kQUnsigned)); }

// NaN-propagating max of |x| (the block scale), as torch.amax: NaN wins.
BF_HD float max_abs(float acc, float x) {
  const float a = x < 0.0f ? -x : x;
  return (a != a || acc != acc) ? (a != a ? a : acc) : (a > acc ? a : acc);
}

}  // namespace bregman
