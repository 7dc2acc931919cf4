// Device-side memory access of the CUDA kernels: aligned vector loads and stores, and the non-zero
// test on stored values. No math here (csrc/bregman_math.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace bregman_cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

// dst = src[i, i + N), one vector load (src + i must be aligned to N elements)
template <int N, typename T>
__device__ __forceinline__ void load_vec(T (&dst)[N], const T* src, int64_t i) {
  const auto v = *reinterpret_cast<const AlignedVector<T, N>*>(src + i);
#pragma unroll
  for (int k = 0; k < N; ++k) dst[k] = v.val[k];
}

// dst[i, i + N) = src, one vector store (dst + i must be aligned to N elements)
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* dst, int64_t i, const T (&src)[N]) {
  AlignedVector<T, N> v;
#pragma unroll
  for (int k = 0; k < N; ++k) v.val[k] = src[k];
  *reinterpret_cast<AlignedVector<T, N>*>(dst + i) = v;
}

// Non-zero test on the stored bits (sign bit ignored, NaN counts, like torch.count_nonzero). A bit
// test and not `x != 0`: under --ftz=true (e.g. a --use_fast_math build) comparisons flush fp32
// subnormals to zero, which would miscount subnormal θ already in memory (the found_inf path
// counts the untouched θ).
__device__ __forceinline__ unsigned int is_nonzero(float x) { return (__float_as_uint(x) << 1) != 0u ? 1u : 0u; }
__device__ __forceinline__ unsigned int is_nonzero(double x) {
  return (static_cast<unsigned long long>(__double_as_longlong(x)) << 1) != 0ull ? 1u : 0u;
}
__device__ __forceinline__ unsigned int is_nonzero(c10::Half x) { return (x.x & 0x7fffu) != 0u ? 1u : 0u; }
__device__ __forceinline__ unsigned int is_nonzero(c10::BFloat16 x) { return (x.x & 0x7fffu) != 0u ? 1u : 0u; }

}  // namespace bregman_cuda
