// The AVX-512 half of moment_memory.h (included from there when CPU_CAPABILITY_AVX512 is defined):
// the same functions on kMomStep = 32 elements (two 16-lane vectors), with the same operations per
// element as the AVX2 ones there and the scalar ones of moment_codes.h, so that the two builds and
// the scalar tail store the same bits. The comments in moment_memory.h explain the formulas; here,
// what AVX-512 changes: mask registers instead of blends and sign tricks, and for the codes the
// saturating down-conversions (vpmov[u]sdb) instead of pack + permute.
#pragma once

#include "simd_memory.h"  // first: see there

#include <cstdint>

#include "moment_codes.h"

#if !defined(CPU_CAPABILITY_AVX512)
#error "moment_memory_avx512.h is the CPU_CAPABILITY_AVX512 half of moment_memory.h: include that"
#endif

namespace bregman::cpu::detail {

static_assert(FVec::size() == 16 && kMomStep == 32, "at::vec's 512-bit Vectorized<float>");

// ---- bf16: stochastic rounding ------------------------------------------------------------------
// sr_mix / bf16_sr8 of moment_memory.h on 16 lanes
inline __m512i sr_mix(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(kFmix1)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(kFmix2)));
  return _mm512_srli_epi32(x, 16);
}

inline __m512i bf16_sr16(__m512 x, __m512i key) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i top = _mm512_srli_epi32(bits, 16);
  const __m512i hashed = _mm512_mullo_epi32(top, _mm512_set1_epi32(static_cast<int>(kHashKey)));
  const __m512i r = sr_mix(_mm512_xor_si512(hashed, key));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, r), 16);
}

// 16 bf16 bits zero-extended to 32-bit lanes and shifted into the top half: the exact widening
inline __m512 widen_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void load_bf16(const uint16_t* p, FVec& a, FVec& b) {
  a = widen_bf16(p);
  b = widen_bf16(p + 16);
}

struct SrKey {
  uint32_t step, stream;
  __m512i key;
  SrKey(uint32_t step_, uint32_t stream_)
      : step(step_), stream(stream_), key(_mm512_set1_epi32(static_cast<int>(sr_key(step_, stream_)))) {}
};

inline void store_bf16_sr(uint16_t* p, const FVec& a, const FVec& b, const SrKey& k) {
  // NaN → 0x7FC0 by a masked move: no test and branch needed with mask registers
  const __m512i canonical = _mm512_set1_epi32(0x7FC0);
  const __m512i lo = _mm512_mask_mov_epi32(bf16_sr16(a, k.key), _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), canonical);
  const __m512i hi = _mm512_mask_mov_epi32(bf16_sr16(b, k.key), _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q), canonical);
  // the lanes hold at most 0xFFFF, so packus does not saturate; it interleaves the 128-bit lanes
  // as quadwords [lo 0-3, hi 0-3, lo 4-7, hi 4-7, ...], which the permute puts back in order
  const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
  const __m512i packed = _mm512_permutexvar_epi64(order, _mm512_packus_epi32(lo, hi));
  _mm512_storeu_si512(reinterpret_cast<__m512i*>(p), packed);
}

// ---- 8-bit codes: decode ----------------------------------------------------------------------
inline void decode_m_vec(const int8_t* p, const FVec& step, FVec& a, FVec& b) {
  const FVec f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const FVec f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  a = (f0 * f0.abs()) * step;
  b = (f1 * f1.abs()) * step;
}

inline void decode_s_vec(const uint8_t* p, const FVec& step, FVec& a, FVec& b) {
  const FVec f0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const FVec f1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  const FVec r0 = (f0 * f0) * step;
  const FVec r1 = (f1 * f1) * step;
  a = r0 * r0;
  b = r1 * r1;
}

// ---- 8-bit codes: the block scale --------------------------------------------------------------
// BlockMax of moment_memory.h: an integer max of the bits, 16 lanes. value() first folds them to
// 8 lanes with the same max, which leaves lane k with the max over the positions ≡ k mod 8, as the
// AVX2 accumulator has it (the same NaN wins among several), then reduces those 8 in the same order.
template <bool kNonNegative = false>
struct BlockMax {
  __m512i acc = _mm512_setzero_si512();
  void add(const FVec& x) {
    const __m512i bits = _mm512_castps_si512(x);
    if constexpr (kNonNegative) {
      acc = _mm512_max_epu32(acc, bits);
    } else {
      acc = _mm512_max_epi32(acc, _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)));
    }
  }
  float one = 0.0f;  // the scalar tail's
  void add1(float x) { one = max_abs(one, x); }
  float value() const {
    const __m256i lo = _mm512_castsi512_si256(acc), hi = _mm512_extracti64x4_epi64(acc, 1);
    const __m256i folded = kNonNegative ? _mm256_max_epu32(lo, hi) : _mm256_max_epi32(lo, hi);
    float buf[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf), folded);
    float m = one;
    for (int k = 0; k < 8; ++k) m = max_abs(m, buf[k]);
    return m;
  }
};

// ---- 8-bit codes: encode ----------------------------------------------------------------------
// codes() of moment_memory.h: rint(Q·√y) as int32; _mm512_cvtps_epi32 rounds in the current mode,
// as rintf does. The narrowing to bytes saturates at 127 (signed) / 255 (unsigned): at Q, which is
// the clamp of code_magnitude (never reached anyway: see moment_memory.h).
inline __m512i codes(__m512 y, __m512 q) { return _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sqrt_ps(y), q)); }

// the signed code of 16 m's: m < 0 ? −c : c, by the sign bit (−0.0 has code 0 either way)
inline __m128i signed_codes(__m512 m, __m512 vinv, __m512 q) {
  const __m512i sign = _mm512_castps_si512(m);
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_and_si512(sign, _mm512_set1_epi32(0x7FFFFFFF)));
  const __m512i c = codes(_mm512_mul_ps(magnitude, vinv), q);
  return _mm512_cvtsepi32_epi8(_mm512_mask_sub_epi32(c, _mm512_movepi32_mask(sign), _mm512_setzero_si512(), c));
}

inline void encode_m_vec(const float* x, float inv, int8_t* out) {
  const __m512 vinv = _mm512_set1_ps(inv), q = _mm512_set1_ps(kQSigned);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), signed_codes(_mm512_loadu_ps(x), vinv, q));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), signed_codes(_mm512_loadu_ps(x + 16), vinv, q));
}

inline void encode_s_vec(const float* r, float inv, uint8_t* out) {
  const __m512 vinv = _mm512_set1_ps(inv), q = _mm512_set1_ps(kQUnsigned);
  const __m512i c0 = codes(_mm512_mul_ps(_mm512_loadu_ps(r), vinv), q);
  const __m512i c1 = codes(_mm512_mul_ps(_mm512_loadu_ps(r + 16), vinv), q);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtusepi32_epi8(c0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtusepi32_epi8(c1));
}

}  // namespace bregman::cpu::detail
