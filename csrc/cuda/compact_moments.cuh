// Device side of compact moments (moments="bf16" | "8bit"; the spec is
// bregman_fused/backends/moments.py, the per-element math csrc/moment_codes.h): how a kernel loads and
// stores a moment in the call's format, the step count the bf16 random bits hash, and the block max of
// the 8-bit scales. Every kernel decodes to float, runs the float update (bregman_math.h's
// update_point, as for fp32 moments), uses the new float m and s for the dual and θ, and only then
// encodes (reference.py).
//
// Where each format runs:
//  - bf16: per element, so the fp32 kernels take it as a template variant (MomentCodec below):
//    elementwise.cu and row_group.cu with Mom = Moments::Bf16.
//  - 8-bit: a code needs its block's new scale, a reduction over 256 elements of one dim-0 row, so
//    it has its own kernel, decomposed by (tensor, row, block) (moments_8bit.cu); a row regularizer
//    then takes θ from the stored duals (row_group.cu with Mom = Moments::Int8).
#pragma once

#include <cstdint>

#include "bregman_math.h"
#include "device_memory.cuh"
#include "launch_args.cuh"
#include "moment_codes.h"

namespace bregman_cuda {

using bregman::Moments;

// The step count as the random bits take it: the reference's int(t), wrapped to uint32 like its
// masks (via int64: a float count is an integer below 2^24, the conversion is exact). Host mode
// converts host_steps on the host; device mode converts the float counter in-kernel.
__host__ __device__ __forceinline__ uint32_t sr_step_of(double t) {
  return static_cast<uint32_t>(static_cast<int64_t>(t));
}

// How an element-wise kernel of format Mom stores one moment element. Fp32: the compute type itself
// (decode and encode are the identity, the fp32 kernels compile as before). Bf16: the bf16 bits,
// widened exactly on load and stochastically rounded on store with random_bits(the value's top 16
// bits, step count, stream). 8-bit moments have no per-element codec (moments_8bit.cu).
template <Moments Mom, typename opmath_t>
struct MomentCodec;

template <typename opmath_t>
struct MomentCodec<Moments::Fp32, opmath_t> {
  using stored_t = opmath_t;
  static __device__ __forceinline__ opmath_t decode(stored_t x) { return x; }
  static __device__ __forceinline__ stored_t encode(opmath_t x, uint32_t, uint32_t) { return x; }
};

template <>
struct MomentCodec<Moments::Bf16, float> {
  using stored_t = uint16_t;  // the raw bf16 bits
  static __device__ __forceinline__ float decode(stored_t h) { return bregman::bf16_bits_to_float(h); }
  // the random bits are keyed by x's top 16 bits (moments.py [note: bf16 rounding])
  static __device__ __forceinline__ stored_t encode(float x, uint32_t step, uint32_t stream) {
    return bregman::round_bf16_sr(x, step, stream);
  }
};

// dst = the decoded moments [i, i + N) of src: one vector load of the stored format (src + i aligned
// to N stored elements). Fp32 is exactly the plain vector load.
template <Moments Mom, int N, typename opmath_t>
__device__ __forceinline__ void load_moments(opmath_t (&dst)[N], const typename MomentCodec<Mom, opmath_t>::stored_t* src,
                                             int64_t i) {
  if constexpr (Mom == Moments::Fp32) {
    load_vec(dst, src, i);
  } else {
    typename MomentCodec<Mom, opmath_t>::stored_t q[N];
    load_vec(q, src, i);
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = MomentCodec<Mom, opmath_t>::decode(q[k]);
  }
}

// dst[i, i + N) = the encoded src.
template <Moments Mom, int N, typename opmath_t>
__device__ __forceinline__ void store_moments(typename MomentCodec<Mom, opmath_t>::stored_t* dst, int64_t i,
                                              const opmath_t (&src)[N], uint32_t step, uint32_t stream) {
  if constexpr (Mom == Moments::Fp32) {
    store_vec(dst, i, src);
  } else {
    typename MomentCodec<Mom, opmath_t>::stored_t q[N];
#pragma unroll
    for (int k = 0; k < N; ++k) q[k] = MomentCodec<Mom, opmath_t>::encode(src[k], step, stream);
    store_vec(dst, i, q);
  }
}

// The step count of table slot `slot` for the random bits (Meta: a compact TensorListMeta): the
// host-made column, or, with the counts on the device (AMP, capturable), the counter itself, read
// in-kernel as the bias corrections are (launch_args.cuh tensor_step_params): no host read.
template <typename Meta, typename opmath_t>
__device__ __forceinline__ uint32_t sr_step(const Meta& meta, const LaunchArgs<opmath_t>& a, int slot) {
  return a.device_steps ? sr_step_of(static_cast<double>(*meta.step_ptr[slot])) : meta.sr_step[slot];
}

// The NaN-propagating max of |x| over the warp (bregman::max_abs, torch.amax's NaN rule), returned to
// every lane. Every lane of the warp must call it.
__device__ __forceinline__ float warp_max_abs(float x) {
  x = bregman::max_abs(0.0f, x);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = bregman::max_abs(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

}  // namespace bregman_cuda
