// Warp and block reductions of the CUDA kernels: row norms (row_group.cu) and the per-block
// non-zero counts added to the op's counts output (both kernels).
#pragma once

#include <cstdint>

namespace bregman_cuda {

// Sum over `width` consecutive lanes (a power of two ≤ 32), returned to each of them.
template <typename T>
__device__ __forceinline__ T warp_sum(T v, int width = 32) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

// Sum over the block, returned to every thread. Every thread of the block must call it.
// `scratch` holds at least blockDim.x / 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int nwarps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous block_sum
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(total);
}

// One atomicAdd per block of the block's non-zero count (every thread must call it).
__device__ __forceinline__ void add_block_count(unsigned long long* counts, int32_t index, unsigned int mine) {
  __shared__ unsigned long long scratch[32];
  const unsigned long long total = block_sum<unsigned long long>(mine, scratch);
  if (threadIdx.x == 0 && total != 0) atomicAdd(counts + index, total);
}

}  // namespace bregman_cuda
