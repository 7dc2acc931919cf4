// SIMD memory access of compact moments (moments="bf16" | "8bit"; the spec is
// bregman_fused/backends/moments.py, the per-element math csrc/moment_codes.h): 16 elements at a time
// (Mem::kStep of the float kernel) decoded to / encoded from two Vectorized<float>.
//
// Why hand-written AVX2: compact moments are only worth having if a step gets faster with the bytes
// it saves, i.e. if it stays memory-bound. Decoding and encoding lane by lane (or the random bits of
// stochastic rounding in scalar code) made it compute-bound. Every function has a portable fallback
// that runs the scalar functions of moment_codes.h lane by lane.
//
// The vector formulas are those of moment_codes.h operation for operation (no FMA: the extension is
// built with -ffp-contract=off), so the SIMD body, the scalar tail and the reference agree bit for bit.
#pragma once

#include "simd_memory.h"  // first: see there

#include <cstdint>
#include <cstring>

#include "moment_codes.h"

namespace bregman::cpu::detail {

using FVec = Vectorized<float>;
constexpr int64_t kMomStep = 2 * FVec::size();  // elements per call below: 16

// ---- bf16: stochastic rounding ------------------------------------------------------------------
// random_bits(index, step, stream) mixes (index·C1) ^ (step·C2) ^ (stream·C3); the last two are one
// per tensor and moment: the key. XOR is associative, so (index·C1) ^ key is the same value.
inline uint32_t sr_key(uint32_t step, uint32_t stream) { return (step * 0x85EBCA77u) ^ (stream * 0xC2B2AE3Du); }

#if defined(CPU_CAPABILITY_AVX2)
// random_bits of 8 lanes from (index·C1) ^ key: murmur3's finalizer, then the top 16 bits
inline __m256i sr_mix(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  return _mm256_srli_epi32(x, 16);
}

// index·C1 (mod 2³²) of elements i .. i+15: i·C1 + k·C1, one broadcast and add instead of a multiply
struct SrIndex {
  __m256i lo, hi;
  explicit SrIndex(int64_t i) {
    constexpr uint32_t c = 0x9E3779B1u;
    const __m256i base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(i) * c));
    auto kc = [](uint32_t k) { return static_cast<int>(k * c); };
    lo = _mm256_add_epi32(base, _mm256_setr_epi32(kc(0), kc(1), kc(2), kc(3), kc(4), kc(5), kc(6), kc(7)));
    hi = _mm256_add_epi32(lo, _mm256_set1_epi32(static_cast<int>(8u * c)));
  }
};

// round_bf16_bits of 8 lanes, in the low 16 bits of each 32-bit lane: (bits + r) >> 16, NaN → 0x7FC0
inline __m256i bf16_sr8(__m256 x, __m256i index_mul, __m256i key) {
  const __m256i r = sr_mix(_mm256_xor_si256(index_mul, key));
  const __m256i bits = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x), r), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC0), nan);
}
#endif

// 16 bf16 moments from p, widened exactly
inline void load_bf16(const uint16_t* p, FVec& a, FVec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
#else
  float buf[kMomStep];
  for (int64_t k = 0; k < kMomStep; ++k) buf[k] = bf16_bits_to_float(p[k]);
  a = FVec::loadu(buf);
  b = FVec::loadu(buf + FVec::size());
#endif
}

// Moment values a, b of elements i .. i+15 stored to p (= moment + i), stochastically rounded with
// random_bits(i + k, step, stream); key = sr_key(step, stream).
inline void store_bf16_sr(uint16_t* p, int64_t i, const FVec& a, const FVec& b, uint32_t step, uint32_t stream) {
#if defined(CPU_CAPABILITY_AVX2)
  const SrIndex index(i);
  const __m256i key = _mm256_set1_epi32(static_cast<int>(sr_key(step, stream)));
  const __m256i lo = bf16_sr8(a, index.lo, key);
  const __m256i hi = bf16_sr8(b, index.hi, key);
  // packus interleaves the 128-bit halves: [lo 0-3, hi 0-3 | lo 4-7, hi 4-7]; the permute restores order
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#else
  float buf[kMomStep];
  a.store(buf);
  b.store(buf + FVec::size());
  for (int64_t k = 0; k < kMomStep; ++k) {
    p[k] = round_bf16_bits(buf[k], random_bits(static_cast<uint32_t>(i + k), step, stream));
  }
#endif
}

// ---- 8-bit codes: decode ----------------------------------------------------------------------
// decode_m / decode_s of moment_codes.h on 16 codes; step = the block's BlockCode::step.
inline void decode_m16(const int8_t* p, const FVec& step, FVec& a, FVec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const FVec f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
  const FVec f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)));
  a = (f0 * f0.abs()) * step;
  b = (f1 * f1.abs()) * step;
#else
  float buf[kMomStep], st[FVec::size()];
  step.store(st);
  for (int64_t k = 0; k < kMomStep; ++k) buf[k] = decode_m(p[k], st[0]);
  a = FVec::loadu(buf);
  b = FVec::loadu(buf + FVec::size());
#endif
}

inline void decode_s16(const uint8_t* p, const FVec& step, FVec& a, FVec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const FVec f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
  const FVec f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
  const FVec r0 = (f0 * f0) * step;
  const FVec r1 = (f1 * f1) * step;
  a = r0 * r0;
  b = r1 * r1;
#else
  float buf[kMomStep], st[FVec::size()];
  step.store(st);
  for (int64_t k = 0; k < kMomStep; ++k) buf[k] = decode_s(p[k], st[0]);
  a = FVec::loadu(buf);
  b = FVec::loadu(buf + FVec::size());
#endif
}

// ---- 8-bit codes: encode ----------------------------------------------------------------------
// The block scale: max_abs (NaN-propagating, as torch.amax) over a vector accumulator (at::vec's
// maximum propagates NaN too) and a scalar one.
inline float reduce_max_abs(const FVec& acc, float acc1) {
  float buf[FVec::size()];
  acc.store(buf);
  for (int64_t k = 0; k < FVec::size(); ++k) acc1 = max_abs(acc1, buf[k]);
  return acc1;
}

#if defined(CPU_CAPABILITY_AVX2)
// code_magnitude for x ≥ 0 of a usable block (inv > 0; no NaN or inf in it, or its scale would be
// one): rint(Q·√(x·inv)) clamped to Q. _mm256_round_ps to nearest is rint's round-half-even.
inline __m256 code_magnitudes(__m256 x, __m256 inv, __m256 q) {
  const __m256 c = _mm256_round_ps(_mm256_mul_ps(_mm256_sqrt_ps(_mm256_mul_ps(x, inv)), q),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(c, q);
}

// 16 int32 lanes (two vectors) → 16 int16 in order (packs interleaves the 128-bit halves)
inline __m256i pack16(__m256i lo, __m256i hi) { return _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8); }
#endif

// encode_m of x[0 .. 16) with the block's inv > 0, to out
inline void encode_m16(const float* x, float inv, int8_t* out) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 vinv = _mm256_set1_ps(inv), q = _mm256_set1_ps(kQSigned), sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8);
  // the magnitude's code with m's sign: m < 0 ? −c : c (−0.0 → code 0 either way)
  const __m256 ca = _mm256_xor_ps(code_magnitudes(_mm256_andnot_ps(sign, a), vinv, q), _mm256_and_ps(sign, a));
  const __m256 cb = _mm256_xor_ps(code_magnitudes(_mm256_andnot_ps(sign, b), vinv, q), _mm256_and_ps(sign, b));
  const __m256i h = pack16(_mm256_cvtps_epi32(ca), _mm256_cvtps_epi32(cb));
  const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bytes);
#else
  for (int64_t k = 0; k < kMomStep; ++k) out[k] = encode_m(x[k], inv);
#endif
}

// encode_s of r[0 .. 16) (r = √s ≥ 0) with the block's inv > 0, to out
inline void encode_s16(const float* r, float inv, uint8_t* out) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 vinv = _mm256_set1_ps(inv), q = _mm256_set1_ps(kQUnsigned);
  const __m256 ca = code_magnitudes(_mm256_loadu_ps(r), vinv, q);
  const __m256 cb = code_magnitudes(_mm256_loadu_ps(r + 8), vinv, q);
  const __m256i h = pack16(_mm256_cvtps_epi32(ca), _mm256_cvtps_epi32(cb));
  const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bytes);
#else
  for (int64_t k = 0; k < kMomStep; ++k) out[k] = encode_s(r[k], inv);
#endif
}

// The codes of one block's len new values x (m, or r = √s) with scale from BlockCode::inv.
inline void encode_block_m(const float* x, int64_t len, float inv, int8_t* out) {
  if (!(inv > 0.0f)) {  // unusable scale (0, inf, NaN): code 0 everywhere
    std::memset(out, 0, static_cast<size_t>(len));
    return;
  }
  int64_t j = 0;
  for (; j + kMomStep <= len; j += kMomStep) encode_m16(x + j, inv, out + j);
  for (; j < len; ++j) out[j] = encode_m(x[j], inv);
}

inline void encode_block_s(const float* r, int64_t len, float inv, uint8_t* out) {
  if (!(inv > 0.0f)) {
    std::memset(out, 0, static_cast<size_t>(len));
    return;
  }
  int64_t j = 0;
  for (; j + kMomStep <= len; j += kMomStep) encode_s16(r + j, inv, out + j);
  for (; j < len; ++j) out[j] = encode_s(r[j], inv);
}

}  // namespace bregman::cpu::detail
