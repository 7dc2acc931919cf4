// SIMD memory access of the CPU kernel: loads of the param (or grad) dtype into the compute type, stores
// back (rounded like Tensor.to(), optionally non-temporal), and the count of non-zeros taken from
// the stored values. No math here (csrc/bregman_math.h), no walking (sweep.h, row_maps.h).
#pragma once

// bregman_math.h with its at::vec::Vectorized overloads: every SIMD header of the CPU kernel
// includes this header first, so that the macro is set before bregman_math.h is first read.
#ifndef BREGMAN_MATH_AT_VEC
#define BREGMAN_MATH_AT_VEC
#endif
#include "bregman_math.h"
#ifndef BREGMAN_MATH_HAS_AT_VEC
#error "bregman_math.h was included before cpu/simd_memory.h: include the CPU kernel headers first"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "work.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace bregman::cpu::detail {

using at::vec::Vectorized;

// bytes: a non-temporal store of a whole vector needs this alignment
#if defined(CPU_CAPABILITY_AVX512)
constexpr uintptr_t kStreamAlign = 64;
#else
constexpr uintptr_t kStreamAlign = 32;
#endif

#if defined(CPU_CAPABILITY_AVX512)
// As the AVX2 ones below, 512 bits wide; the compare writes a mask register, no movemask needed.
inline void store512(float* p, __m512 x, bool stream) { stream ? _mm512_stream_ps(p, x) : _mm512_storeu_ps(p, x); }
inline void store512(double* p, __m512d x, bool stream) { stream ? _mm512_stream_pd(p, x) : _mm512_storeu_pd(p, x); }
inline unsigned nonzero_bits(__m512 x) { return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ); }
inline unsigned nonzero_bits(__m512d x) { return _mm512_cmp_pd_mask(x, _mm512_setzero_pd(), _CMP_NEQ_UQ); }
#elif defined(CPU_CAPABILITY_AVX2)
// One 256-bit store of float or double lanes (streaming or not), and the lane bits of the non-zero
// lanes: unordered not-equal, so NaN counts and −0 does not, like torch.count_nonzero.
inline void store256(float* p, __m256 x, bool stream) { stream ? _mm256_stream_ps(p, x) : _mm256_storeu_ps(p, x); }
inline void store256(double* p, __m256d x, bool stream) { stream ? _mm256_stream_pd(p, x) : _mm256_storeu_pd(p, x); }
inline int nonzero_bits(__m256 x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_UQ)); }
inline int nonzero_bits(__m256d x) { return _mm256_movemask_pd(_mm256_cmp_pd(x, _mm256_setzero_pd(), _CMP_NEQ_UQ)); }
#endif

// ---- memory access: param dtype <-> compute type --------------------------------------------
template <typename scalar_t>
struct Mem {
  using T = opmath_t<scalar_t>;
  using Vec = Vectorized<T>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kStep = 2 * kVec;  // elements per iteration of a vector body
  static constexpr bool kReduced = !std::is_same_v<scalar_t, T>;

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      at::vec::load_to_float<scalar_t>(p, a, b);
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec);
    }
  }

  // Stores a, b to p (rounding to the param dtype like Tensor.to()) and counts the non-zeros of
  // the values as stored, which is what the count must see (a tiny float can round to 0 in half).
  // [note: counting on the stored bits] With AVX2 / AVX-512 the count is taken from the stored
  // vector itself (a compare + movemask or mask register + popcount), not by widening it back to
  // float and comparing lanes: for bf16/fp16 that round trip cost more than the rest of a ProxSGD step.
  template <typename Counter>
  static void store(scalar_t* p, const Vec& a, const Vec& b, bool stream, Counter& nnz) {
    if constexpr (kReduced) {
      auto h = at::vec::convert_from_float<scalar_t>(a, b);
#if defined(CPU_CAPABILITY_AVX512)
      const __m512i bits = h;
      if (stream) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bits);
      } else {
        _mm512_storeu_si512(reinterpret_cast<__m512i*>(p), bits);
      }
      // ±0: all-zero but the sign bit (the AVX2 path's test in one instruction)
      const __mmask32 is_zero = _mm512_testn_epi16_mask(bits, _mm512_set1_epi16(0x7fff));
      nnz.add(2 * kVec - __builtin_popcount(static_cast<unsigned>(is_zero)));
#elif defined(CPU_CAPABILITY_AVX2)
      const __m256i bits = h;
      if (stream) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
      }
      // ±0 is all-zero but the sign bit; NaN and subnormals count, like torch.count_nonzero
      const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi16(0x7fff));
      const __m256i is_zero = _mm256_cmpeq_epi16(magnitude, _mm256_setzero_si256());
      nnz.add(2 * kVec - __builtin_popcount(static_cast<unsigned>(_mm256_movemask_epi8(is_zero))) / 2);
#else
      (void)stream;
      h.store(p);
      auto [a2, b2] = at::vec::convert_to_float<scalar_t>(h);
      nnz.add(a2, b2);
#endif
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      store512(p, a, stream);
      store512(p + kVec, b, stream);
      nnz.add(__builtin_popcount(nonzero_bits(a) | (nonzero_bits(b) << kVec)));
#elif defined(CPU_CAPABILITY_AVX2)
      store256(p, a, stream);
      store256(p + kVec, b, stream);
      nnz.add(__builtin_popcount(static_cast<unsigned>(nonzero_bits(a) | (nonzero_bits(b) << kVec))));
#else
      (void)stream;
      a.store(p);
      b.store(p + kVec);
      nnz.add(a, b);
#endif
    }
  }

  static T load1(const scalar_t* p) { return static_cast<T>(*p); }
  static T store1(scalar_t* p, T x) {
    scalar_t y = static_cast<scalar_t>(x);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // a NaN as at::vec's conversion in store() (and Tensor.to()) writes it, 0xFFFF, not c10's
      // 0x7FC0: the tail then stores the SIMD body's bits, whichever elements the vector width
      // leaves to it
      if (x != x) y = c10::BFloat16(0xFFFF, c10::BFloat16::from_bits());
    }
    *p = y;
    return static_cast<T>(y);
  }

  // Elements to handle one by one from p before a streaming vector store is aligned.
  static int64_t peel(const scalar_t* p, int64_t len, bool stream) {
    if (!stream) return 0;
    const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % kStreamAlign;
    if (mis == 0) return 0;
    if (mis % sizeof(scalar_t) != 0) return len;  // cannot align: all scalar
    return std::min<int64_t>(len, static_cast<int64_t>((kStreamAlign - mis) / sizeof(scalar_t)));
  }
};

// Loads of grads of grad_t beside params of scalar_t: grad_t is the param dtype or the compute type
// itself, loaded into the same vectors (csrc/grad_dtypes.h [note: grad dtypes]).
template <typename scalar_t, typename grad_t>
using GradMem = std::enable_if_t<std::is_same_v<opmath_t<grad_t>, opmath_t<scalar_t>>, Mem<grad_t>>;

template <typename T>
int64_t lanes_sum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T total = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) total += buf[k];
  return static_cast<int64_t>(total);
}

// Non-zeros written by one chunk: exact integer counts from the AVX2 / AVX-512 stores, lane masks
// summed in the compute type otherwise (exact: a chunk holds far fewer than 2^24 elements per lane).
template <typename T>
struct NonZeros {
  int64_t n = 0;
  Vectorized<T> lanes = Vectorized<T>(T(0));
  void add(int64_t k) { n += k; }
  void add(const Vectorized<T>& a, const Vectorized<T>& b) {
    const Vectorized<T> zero(T(0));
    lanes = lanes + a.ne(zero) + b.ne(zero);
  }
  void add_one(T stored) { n += stored != T(0); }
  int64_t total() const { return n + lanes_sum(lanes); }
};

}  // namespace bregman::cpu::detail
