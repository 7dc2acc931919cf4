// SIMD memory access of compact moments (moments="bf16" | "8bit"; the spec is
// bregman_fused/backends/moments.py, the per-element math csrc/moment_codes.h): kMomStep elements at
// a time (Mem::kStep of the float kernel: 16 with AVX2, 32 with AVX-512) decoded to / encoded from
// two Vectorized<float>.
//
// Why hand-written AVX2 / AVX-512: compact moments are only worth having if a step gets faster with
// the bytes it saves, i.e. if it stays memory-bound. Decoding and encoding lane by lane (or the
// random bits of stochastic rounding in scalar code) made it compute-bound. The AVX-512 versions
// are in moment_memory_avx512.h; below, the AVX2 ones, each with a portable fallback that runs the
// scalar functions of moment_codes.h lane by lane.
//
// The vector formulas are those of moment_codes.h operation for operation (no FMA: the extension is
// built with -ffp-contract=off), so the SIMD body, the scalar tail and the reference agree bit for
// bit, and so do the AVX2 and AVX-512 builds.
#pragma once

#include "simd_memory.h"  // first: see there

#include <cstdint>
#include <cstring>

#include "moment_codes.h"

namespace bregman::cpu::detail {

using FVec = Vectorized<float>;
constexpr int64_t kMomStep = 2 * FVec::size();  // elements per call below: 16 (AVX2), 32 (AVX-512)

// ---- bf16: stochastic rounding ------------------------------------------------------------------
// random_bits(top16(x), step, stream) mixes (top16(x)·C1) ^ (step·C2) ^ (stream·C3); the last two
// are one per tensor and moment: the key. XOR is associative, so (top16(x)·C1) ^ key is the same.
inline uint32_t sr_key(uint32_t step, uint32_t stream) { return (step * kHashStep) ^ (stream * kHashStream); }

}  // namespace bregman::cpu::detail

#if defined(CPU_CAPABILITY_AVX512)
#include "moment_memory_avx512.h"
#else
namespace bregman::cpu::detail {

#if defined(CPU_CAPABILITY_AVX2)
// random_bits of 8 lanes from (top16(x)·C1) ^ key: murmur3's finalizer, then its top 16 bits. The
// finalizer's last step, x ^= x >> 16, only changes the low 16 bits, so it is left out.
inline __m256i sr_mix(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kFmix1)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kFmix2)));
  return _mm256_srli_epi32(x, 16);
}

// (bits(x) + random bits) >> 16 of 8 lanes, in the low 16 bits of each 32-bit lane (NaN not handled)
inline __m256i bf16_sr8(__m256 x, __m256i key) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i top = _mm256_srli_epi32(bits, 16);
  const __m256i r = sr_mix(_mm256_xor_si256(_mm256_mullo_epi32(top, _mm256_set1_epi32(static_cast<int>(kHashKey))), key));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, r), 16);
}
#endif

// kMomStep bf16 moments from p, widened exactly
inline void load_bf16(const uint16_t* p, FVec& a, FVec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  // quadwords [0-3, 8-11 | 4-7, 12-15], then each bf16 into the top half of a zeroed 32-bit lane
  const __m256i h = _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 0xD8);
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
#else
  float buf[kMomStep];
  for (int64_t k = 0; k < kMomStep; ++k) buf[k] = bf16_bits_to_float(p[k]);
  a = FVec::loadu(buf);
  b = FVec::loadu(buf + FVec::size());
#endif
}

// The stochastic rounding of one moment (key = sr_key(step, stream)), for store_bf16_sr.
struct SrKey {
  uint32_t step, stream;
#if defined(CPU_CAPABILITY_AVX2)
  __m256i key;
  SrKey(uint32_t step_, uint32_t stream_)
      : step(step_), stream(stream_), key(_mm256_set1_epi32(static_cast<int>(sr_key(step_, stream_)))) {}
#else
  SrKey(uint32_t step_, uint32_t stream_) : step(step_), stream(stream_) {}
#endif
};

// kMomStep moment values a, b stored to p, stochastically rounded with random_bits(top16(value), step, stream).
inline void store_bf16_sr(uint16_t* p, const FVec& a, const FVec& b, const SrKey& k) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256i lo = bf16_sr8(a, k.key);
  __m256i hi = bf16_sr8(b, k.key);
  // NaN → 0x7FC0 (the canonical NaN, as nearest rounding gives): one test for the 16 lanes
  const __m256 nan = _mm256_cmp_ps(a, b, _CMP_UNORD_Q);
  if (__builtin_expect(!_mm256_testz_ps(nan, nan), 0)) {
    const __m256i canonical = _mm256_set1_epi32(0x7FC0);
    lo = _mm256_blendv_epi8(lo, canonical, _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
    hi = _mm256_blendv_epi8(hi, canonical, _mm256_castps_si256(_mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
  }
  // packus interleaves the 128-bit halves: [lo 0-3, hi 0-3 | lo 4-7, hi 4-7]; the permute restores order
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#else
  float buf[kMomStep];
  a.store(buf);
  b.store(buf + FVec::size());
  for (int64_t j = 0; j < kMomStep; ++j) p[j] = round_bf16_sr(buf[j], k.step, k.stream);
#endif
}

// ---- 8-bit codes: decode ----------------------------------------------------------------------
// decode_m / decode_s of moment_codes.h on kMomStep codes; step = the block's BlockCode::step.
inline void decode_m_vec(const int8_t* p, const FVec& step, FVec& a, FVec& b) {
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

inline void decode_s_vec(const uint8_t* p, const FVec& step, FVec& a, FVec& b) {
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

// ---- 8-bit codes: the block scale --------------------------------------------------------------
// max |x| over a block, NaN-propagating as torch.amax (and max_abs). AVX2: an integer max of the
// bits: for non-negative floats the integer order is the float order, and a NaN lies above +inf,
// so a NaN wins; one or two instructions instead of at::vec::maximum's three and an abs.
// kNonNegative: x is +0, positive or NaN (r = √s: s = fma(…) + β2·s is never −0), so an unsigned
// max of the bits as they are does it (a NaN with its sign bit set is above everything, too).
template <bool kNonNegative = false>
struct BlockMax {
#if defined(CPU_CAPABILITY_AVX2)
  __m256i acc = _mm256_setzero_si256();
  void add(const FVec& x) {
    if constexpr (kNonNegative) {
      acc = _mm256_max_epu32(acc, _mm256_castps_si256(x));
    } else {
      acc = _mm256_max_epi32(acc, _mm256_castps_si256(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)));
    }
  }
#else
  FVec acc = FVec(0.0f);
  void add(const FVec& x) { acc = at::vec::maximum(acc, x.abs()); }
#endif
  float one = 0.0f;  // the scalar tail's
  void add1(float x) { one = max_abs(one, x); }
  float value() const {
    float buf[FVec::size()];
#if defined(CPU_CAPABILITY_AVX2)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf), acc);
#else
    acc.store(buf);
#endif
    float m = one;
    for (int64_t k = 0; k < FVec::size(); ++k) m = max_abs(m, buf[k]);
    return m;
  }
};

// ---- 8-bit codes: encode ----------------------------------------------------------------------
#if defined(CPU_CAPABILITY_AVX2)
// code_magnitude of y = x·inv ≥ 0 in a usable block (inv > 0: no NaN or inf in it, or its scale
// would be one), as int32: rint(Q·√y). _mm256_cvtps_epi32 rounds in the current rounding mode, as
// rintf does (to nearest even; torch never changes it). The clamp to Q is left out: x ≤ scale, so
// y ≤ scale·RN(1/scale) ≤ 1 + 2⁻²³, √y ≤ 1 + 2⁻²³ and Q·√y rounds to Q at most.
//
// The √ per element keeps the divider busy (with AdaBreg's own √s and two divisions), but
// replacing it by _mm256_rsqrt_ps, a Newton step and a check for the lanes near a rounding boundary
// measured slower (the multiply ports are as busy), so: exact.
inline __m256i codes(__m256 y, __m256 q) { return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sqrt_ps(y), q)); }

// 16 int32 lanes (two vectors) → 16 bytes in order, saturating as signed or unsigned bytes: the
// packs interleave 128-bit halves (lane 0: lo 0-3, hi 0-3; lane 1: lo 4-7, hi 4-7), the dword
// permute restores the order.
template <bool kUnsigned>
inline void store_bytes16(__m256i lo, __m256i hi, void* out) {
  const __m256i w = _mm256_packs_epi32(lo, hi);
  const __m256i b = kUnsigned ? _mm256_packus_epi16(w, w) : _mm256_packs_epi16(w, w);
  const __m256i ordered = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(ordered));
}
#endif

// encode_m of x[0 .. kMomStep) with the block's inv > 0, to out
inline void encode_m_vec(const float* x, float inv, int8_t* out) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 vinv = _mm256_set1_ps(inv), q = _mm256_set1_ps(kQSigned), sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8);
  __m256i ca = codes(_mm256_mul_ps(_mm256_andnot_ps(sign, a), vinv), q);
  __m256i cb = codes(_mm256_mul_ps(_mm256_andnot_ps(sign, b), vinv), q);
  // m < 0 ? −c : c. _mm256_sign_epi32 negates where m's bits are negative as int32 (−0.0 too,
  // whose code is 0) and zeroes where they are 0 (+0.0, code 0 as well).
  ca = _mm256_sign_epi32(ca, _mm256_castps_si256(a));
  cb = _mm256_sign_epi32(cb, _mm256_castps_si256(b));
  store_bytes16<false>(ca, cb, out);
#else
  for (int64_t k = 0; k < kMomStep; ++k) out[k] = encode_m(x[k], inv);
#endif
}

// encode_s of r[0 .. kMomStep) (r = √s ≥ 0) with the block's inv > 0, to out
inline void encode_s_vec(const float* r, float inv, uint8_t* out) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 vinv = _mm256_set1_ps(inv), q = _mm256_set1_ps(kQUnsigned);
  store_bytes16<true>(codes(_mm256_mul_ps(_mm256_loadu_ps(r), vinv), q),
                      codes(_mm256_mul_ps(_mm256_loadu_ps(r + 8), vinv), q), out);
#else
  for (int64_t k = 0; k < kMomStep; ++k) out[k] = encode_s(r[k], inv);
#endif
}

}  // namespace bregman::cpu::detail
#endif  // CPU_CAPABILITY_AVX512

namespace bregman::cpu::detail {

// The codes of elements [from, len) of one block's new values x (m, or r = √s), inv its scale's
// BlockCode::inv. A block with an unusable scale (0, inf, NaN; inv = 0) gets code 0 everywhere.
inline void encode_block_m(const float* x, int64_t len, int64_t from, float inv, int8_t* out) {
  if (!(inv > 0.0f)) {
    std::memset(out, 0, static_cast<size_t>(len));
    return;
  }
  int64_t j = from;
  for (; j + kMomStep <= len; j += kMomStep) encode_m_vec(x + j, inv, out + j);
  for (; j < len; ++j) out[j] = encode_m(x[j], inv);
}

inline void encode_block_s(const float* r, int64_t len, int64_t from, float inv, uint8_t* out) {
  if (!(inv > 0.0f)) {
    std::memset(out, 0, static_cast<size_t>(len));
    return;
  }
  int64_t j = from;
  for (; j + kMomStep <= len; j += kMomStep) encode_s_vec(r + j, inv, out + j);
  for (; j < len; ++j) out[j] = encode_s(r[j], inv);
}

}  // namespace bregman::cpu::detail
