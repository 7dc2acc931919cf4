// The multi-tensor launcher shared by the element-wise and the row-group kernels: the per-launch
// tensor table, how it is filled and cut into launches. Device-side helpers live beside it:
// launch_args.cuh (the per-call arguments), device_memory.cuh (loads, stores, non-zero tests),
// reductions.cuh (warp and block sums).
//
// [note: multi-tensor apply] The design follows PyTorch's MultiTensorApply.cuh and apex's
// multi_tensor_apply (the code is our own): every tensor is cut into chunks, each block of a launch
// processes one (tensor, chunk) pair, and everything a block needs — the tensors' addresses and
// sizes and the block → (tensor slot, chunk) map — travels inside ONE struct passed by value as a
// kernel argument (no device allocation, no host→device copy, so it is CUDA-graph safe). A launch
// takes as many tensors and blocks as fit in the classic 4 KiB kernel-argument space; when either
// table is full the struct is launched and refilled, and a tensor cut by a full block table
// continues in slot 0 of the next launch. Tensors with no elements get no blocks.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "bregman_math.h"
#include "fused_step_cuda.h"
#include "launch_args.cuh"

namespace bregman_cuda {

// ---- launch geometry -----------------------------------------------------------------------------
constexpr int kMaxBlocksPerLaunch = 320;
// Bytes of kernel arguments we allow ourselves: the classic 4 KiB limit (works with every driver;
// the 32 KiB limit of CUDA ≥ 12.1 would need a newer driver everywhere the wheel runs).
constexpr int kArgBytes = 4096;
// Room kept for the LaunchArgs struct passed next to the tensor table.
constexpr int kLaunchArgsReserve = 320;

// Pointer order in TensorListMeta::ptrs: param, grad, dual, m (momentum buffer / exp_avg), s.
constexpr int kParam = 0, kGrad = 1, kDual = 2, kExpAvg = 3, kExpAvgSq = 4;

// How many tensor lists a kind reads and writes.
constexpr int list_depth(Kind kind, bool momentum) {
  return kind == Kind::ProxSGD ? 2 : kind == Kind::AdaBreg ? 5 : (momentum ? 4 : 3);
}

template <int Depth, typename opmath_t>
constexpr int max_tensors_per_launch() {
  // per tensor: Depth addresses, numel, group size, step pointer, 2 step constants, index
  constexpr int per_tensor = Depth * 8 + 8 + 8 + 8 + 2 * static_cast<int>(sizeof(opmath_t)) + 4;
  constexpr int fit = (kArgBytes - kLaunchArgsReserve - kMaxBlocksPerLaunch * 5 - 16) / per_tensor;
  return fit < 255 ? fit : 255;  // block_to_tensor is a uint8
}

// The per-launch table (see [note: multi-tensor apply]).
template <int Depth, typename opmath_t>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors_per_launch<Depth, opmath_t>();
  void* ptrs[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t group_size[kMaxTensors];     // row length n (1 for the element-wise maps)
  const float* step_ptr[kMaxTensors];  // device mode: the tensor's (already incremented) step
  opmath_t step_size[kMaxTensors];     // host mode: AdaBreg τ/(1−β1^t) of this tensor
  opmath_t bc2_sqrt[kMaxTensors];      // host mode: AdaBreg √(1−β2^t) of this tensor
  int32_t tensor_index[kMaxTensors];   // index into the op's lists (the counts output)
  uint8_t block_to_tensor[kMaxBlocksPerLaunch];
  int32_t block_to_chunk[kMaxBlocksPerLaunch];

  __host__ void copy_slot(int from, int to) {
    for (int d = 0; d < Depth; ++d) ptrs[d][to] = ptrs[d][from];
    numel[to] = numel[from];
    group_size[to] = group_size[from];
    step_ptr[to] = step_ptr[from];
    step_size[to] = step_size[from];
    bc2_sqrt[to] = bc2_sqrt[from];
    tensor_index[to] = tensor_index[from];
  }
};

template <int Depth, typename opmath_t>
constexpr bool fits_argument_space() {
  return sizeof(TensorListMeta<Depth, opmath_t>) + sizeof(LaunchArgs<opmath_t>) <= kArgBytes;
}
static_assert(fits_argument_space<2, float>() && fits_argument_space<3, float>() &&
                  fits_argument_space<4, float>() && fits_argument_space<5, float>() &&
                  fits_argument_space<2, double>() && fits_argument_space<5, double>(),
              "tensor table + launch arguments exceed the 4 KiB kernel-argument space");
static_assert(sizeof(LaunchArgs<double>) <= kLaunchArgsReserve, "raise kLaunchArgsReserve");

// ---- host launcher -------------------------------------------------------------------------------
// fill(meta, slot, i): write tensor i's entries into `slot`; num_chunks(i): blocks tensor i needs
// (0 to skip it); launch(meta, nblocks): launch the kernel on the current table.
template <typename Meta, typename Fill, typename NumChunks, typename Launch>
void multi_tensor_apply(int64_t ntensors, Fill&& fill, NumChunks&& num_chunks, Launch&& launch) {
  Meta meta{};
  int slot = 0;
  int blocks = 0;
  for (int64_t i = 0; i < ntensors; ++i) {
    const int64_t nchunks = num_chunks(i);
    if (nchunks == 0) continue;
    TORCH_CHECK(nchunks <= INT32_MAX, "bregman_fused: tensor ", i, " has too many chunks (", nchunks, ")");
    fill(meta, slot, i);
    for (int64_t c = 0; c < nchunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<uint8_t>(slot);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == nchunks;
      if (blocks == kMaxBlocksPerLaunch || (last_chunk && slot + 1 == Meta::kMaxTensors)) {
        launch(meta, blocks);
        blocks = 0;
        if (last_chunk) {
          slot = -1;  // the next tensor starts in slot 0
        } else {
          meta.copy_slot(slot, 0);  // the rest of this tensor continues in slot 0
          slot = 0;
        }
      }
    }
    ++slot;
  }
  if (blocks > 0) launch(meta, blocks);
}

// Tensor i's entries of the table: addresses, size, row length and step constants.
template <int Depth, typename opmath_t>
__host__ void fill_slot(TensorListMeta<Depth, opmath_t>& meta, int slot, int64_t i, const StepInputs& in) {
  const bregman::StepTensors& t = in.tensors;
  meta.ptrs[kParam][slot] = t.params[i].data_ptr();
  meta.ptrs[kGrad][slot] = t.grads[i].data_ptr();
  if constexpr (Depth >= 3) meta.ptrs[kDual][slot] = t.duals[i].data_ptr();
  if constexpr (Depth >= 4) meta.ptrs[kExpAvg][slot] = t.exp_avgs[i].data_ptr();
  if constexpr (Depth >= 5) meta.ptrs[kExpAvgSq][slot] = t.exp_avg_sqs[i].data_ptr();
  meta.numel[slot] = t.params[i].numel();
  meta.group_size[slot] = t.group_sizes.empty() ? 1 : t.group_sizes[i];
  meta.tensor_index[slot] = static_cast<int32_t>(i);
  if (in.device_steps) {
    meta.step_ptr[slot] = t.steps[i].data_ptr<float>();
    meta.step_size[slot] = opmath_t(0);
    meta.bc2_sqrt[slot] = opmath_t(1);
  } else {
    meta.step_ptr[slot] = nullptr;
    const auto p = bregman::make_step_params<opmath_t>(in.hyper, in.host_steps[i], meta.group_size[slot]);
    meta.step_size[slot] = p.step_size;
    meta.bc2_sqrt[slot] = p.bc2_sqrt;
  }
}

// One step call of variant V (dispatch_step.cuh) on the current stream: the tables filled, cut
// into launches, and launch_kernel(meta, args, nblocks, stream) called for each; num_chunks(i):
// the blocks tensor i needs (0 to skip it). Tensors of another launch series are skipped.
template <typename V, typename NumChunks, typename LaunchKernel>
void launch_step_tables(const StepInputs& in, NumChunks&& num_chunks, LaunchKernel&& launch_kernel) {
  using opmath_t = typename V::opmath_t;
  constexpr int Depth = list_depth(V::kind, V::momentum);
  using Meta = TensorListMeta<Depth, opmath_t>;
  const LaunchArgs<opmath_t> args = make_launch_args<opmath_t>(in);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  multi_tensor_apply<Meta>(
      static_cast<int64_t>(in.tensors.size()),
      [&](Meta& meta, int slot, int64_t i) { fill_slot<Depth, opmath_t>(meta, slot, i, in); },
      [&](int64_t i) -> int64_t { return in.in_series(i) ? num_chunks(i) : 0; },
      [&](const Meta& meta, int nblocks) {
        launch_kernel(meta, args, nblocks, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace bregman_cuda
