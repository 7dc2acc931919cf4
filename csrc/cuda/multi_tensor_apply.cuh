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
//
// Compact moments (moments="bf16" | "8bit", csrc/cuda/compact_moments.cuh) use the same table with two
// more columns (CompactColumns) and, for 8-bit, the scale lists; fp32 moments keep the table as it was.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "bregman_math.h"
#include "compact_moments.cuh"
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

// Pointer order in TensorListMeta::ptrs: param, grad, dual, m (momentum buffer / exp_avg), s, and
// for 8-bit moments the block scales of m and s (s and its scales are nullptr for LinBreg).
constexpr int kParam = 0, kGrad = 1, kDual = 2, kExpAvg = 3, kExpAvgSq = 4, kExpAvgScale = 5, kExpAvgSqScale = 6;

// How many tensor lists a kind reads and writes.
constexpr int list_depth(Kind kind, bool momentum) {
  return kind == Kind::ProxSGD ? 2 : kind == Kind::AdaBreg ? 5 : (momentum ? 4 : 3);
}

// The table's pointer lists for moments of format `mom`: 8-bit adds the two scale lists (fixed
// indices, so LinBreg's table carries an unused s slot rather than a second index layout).
constexpr int table_depth(Kind kind, bool momentum, bregman::Moments mom) {
  return mom == bregman::Moments::Int8 ? 7 : list_depth(kind, momentum);
}

template <int Depth, typename opmath_t, bool Compact = false>
constexpr int max_tensors_per_launch() {
  // per tensor: Depth addresses, numel, group size, step pointer, 2 step constants, index
  // (+ compact moments: the random-bit step count and the row length)
  constexpr int per_tensor =
      Depth * 8 + 8 + 8 + 8 + 2 * static_cast<int>(sizeof(opmath_t)) + 4 + (Compact ? 4 + 8 : 0);
  constexpr int fit = (kArgBytes - kLaunchArgsReserve - kMaxBlocksPerLaunch * 5 - 16) / per_tensor;
  return fit < 255 ? fit : 255;  // block_to_tensor is a uint8
}

// The columns only compact-moment tables have, as a base class: empty (and, by the empty-base
// rule, taking no bytes) for fp32 moments, whose table keeps exactly its layout.
struct NoCompactColumns {
  __host__ void copy_compact(int, int) {}
};
template <int N>
struct CompactColumns {
  uint32_t sr_step[N];  // bf16, host mode: the step count the random bits hash (sr_step_of)
  int64_t row_len[N];   // 8-bit: elements per dim-0 row (numel / shape[0]); blocks follow rows
  __host__ void copy_compact(int from, int to) {
    sr_step[to] = sr_step[from];
    row_len[to] = row_len[from];
  }
};

// The per-launch table (see [note: multi-tensor apply]).
template <int Depth, typename opmath_t, bool Compact = false>
struct TensorListMeta
    : std::conditional_t<Compact, CompactColumns<max_tensors_per_launch<Depth, opmath_t, Compact>()>,
                         NoCompactColumns> {
  static constexpr int kMaxTensors = max_tensors_per_launch<Depth, opmath_t, Compact>();
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
    this->copy_compact(from, to);
  }
};

// The table of a kernel variant: kind, momentum and moment format decide its lists and columns.
template <Kind K, bool Momentum, bregman::Moments Mom, typename opmath_t>
using StepTable = TensorListMeta<table_depth(K, Momentum, Mom), opmath_t, Mom != bregman::Moments::Fp32>;

template <int Depth, typename opmath_t, bool Compact = false>
constexpr bool fits_argument_space() {
  return sizeof(TensorListMeta<Depth, opmath_t, Compact>) + sizeof(LaunchArgs<opmath_t>) <= kArgBytes;
}
static_assert(fits_argument_space<2, float>() && fits_argument_space<3, float>() &&
                  fits_argument_space<4, float>() && fits_argument_space<5, float>() &&
                  fits_argument_space<2, double>() && fits_argument_space<5, double>() &&
                  fits_argument_space<4, float, true>() && fits_argument_space<5, float, true>() &&
                  fits_argument_space<7, float, true>(),
              "tensor table + launch arguments exceed the 4 KiB kernel-argument space");
static_assert(sizeof(LaunchArgs<double>) <= kLaunchArgsReserve, "raise kLaunchArgsReserve");
// fp32 moments: the empty base takes no bytes, the table starts with its pointers as before
using AdaBregFp32Table = TensorListMeta<5, float>;
static_assert(std::is_standard_layout_v<AdaBregFp32Table> && offsetof(AdaBregFp32Table, ptrs) == 0,
              "the fp32 table must keep its layout");

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

// Tensor i of `list`, or nullptr where the kind has no such list (LinBreg in an 8-bit table).
__host__ inline void* list_ptr(at::TensorList list, int64_t i) {
  return list.empty() ? nullptr : list[i].data_ptr();
}

// Tensor i's entries of the table: addresses, size, row length and step constants.
template <int Depth, typename opmath_t, bool Compact>
__host__ void fill_slot(TensorListMeta<Depth, opmath_t, Compact>& meta, int slot, int64_t i, const StepInputs& in) {
  const bregman::StepTensors& t = in.tensors;
  meta.ptrs[kParam][slot] = t.params[i].data_ptr();
  meta.ptrs[kGrad][slot] = t.grads[i].data_ptr();
  if constexpr (Depth >= 3) meta.ptrs[kDual][slot] = t.duals[i].data_ptr();
  if constexpr (Depth >= 4) meta.ptrs[kExpAvg][slot] = t.exp_avgs[i].data_ptr();
  if constexpr (Depth >= 5) meta.ptrs[kExpAvgSq][slot] = list_ptr(t.exp_avg_sqs, i);
  if constexpr (Depth >= 7) {
    meta.ptrs[kExpAvgScale][slot] = list_ptr(t.exp_avg_scales, i);
    meta.ptrs[kExpAvgSqScale][slot] = list_ptr(t.exp_avg_sq_scales, i);
  }
  if constexpr (Compact) {
    const at::Tensor& p = t.params[i];
    // only tensors with elements get a slot, so dim() >= 1 and shape[0] > 0 for 8-bit ones; a 0-dim
    // bf16 one gets 1 (its row_len is never read)
    meta.row_len[slot] = p.dim() >= 1 && p.size(0) > 0 ? p.numel() / p.size(0) : 1;
    meta.sr_step[slot] = in.device_steps ? 0u : sr_step_of(in.host_steps[i]);  // device mode: read in-kernel
  }
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
  using Meta = StepTable<V::kind, V::momentum, V::moments, opmath_t>;
  const LaunchArgs<opmath_t> args = make_launch_args<opmath_t>(in);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  multi_tensor_apply<Meta>(
      static_cast<int64_t>(in.tensors.size()),
      [&](Meta& meta, int slot, int64_t i) { fill_slot(meta, slot, i, in); },
      [&](int64_t i) -> int64_t { return in.in_series(i) ? num_chunks(i) : 0; },
      [&](const Meta& meta, int nblocks) {
        launch_kernel(meta, args, nblocks, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace bregman_cuda
