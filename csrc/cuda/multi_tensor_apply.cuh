// Multi-tensor launcher shared by the element-wise and the row-group kernels, plus the per-call
// helpers both use (per-tensor step constants). Loads, stores and non-zero tests: device_memory.cuh;
// warp and block sums: reductions.cuh.
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
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "bregman_math.h"
#include "device_memory.cuh"
#include "reductions.cuh"

namespace bregman_cuda {

using bregman::Kind;
using bregman::Reg;
using bregman::StepParams;

// ---- launch geometry -----------------------------------------------------------------------------
constexpr int kMaxBlocksPerLaunch = 320;
// Bytes of kernel arguments we allow ourselves: the classic 4 KiB limit (works with every driver;
// the 32 KiB limit of CUDA ≥ 12.1 would need a newer driver everywhere the wheel runs).
constexpr int kArgBytes = 4096;
// Room kept for the Hyper struct passed next to the tensor table.
constexpr int kHyperReserve = 320;

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
  constexpr int fit = (kArgBytes - kHyperReserve - kMaxBlocksPerLaunch * 5 - 16) / per_tensor;
  return fit < 255 ? fit : 255;  // block_to_tensor is a uint8
}

// The per-launch table (see [note: multi-tensor apply]).
template <int Depth, typename opmath_t>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors_per_launch<Depth, opmath_t>();
  void* ptrs[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t group_size[kMaxTensors];     // row length n (row kernel only)
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

// Scalars of a call, shared by all tensors (passed by value next to the table).
template <typename opmath_t>
struct Hyper {
  StepParams<opmath_t> hp;  // host-filled; step_size / bc2_sqrt replaced per tensor
  // raw hyper-parameters for the in-kernel make_step_params (device mode)
  double lr, beta1, beta2, eps, delta, lamda_l1, lamda_group;
  const void* lr_ptr;  // capturable: 0-dim device lr, nullptr otherwise
  const float* grad_scale;
  const float* found_inf;
  unsigned long long* counts;  // int64 counts, one per tensor of the op call
  Kind kind;
  Reg reg;
  bool lr_is_double;
  bool device_steps;
};

template <int Depth, typename opmath_t>
constexpr bool fits_argument_space() {
  return sizeof(TensorListMeta<Depth, opmath_t>) + sizeof(Hyper<opmath_t>) <= kArgBytes;
}
static_assert(fits_argument_space<2, float>() && fits_argument_space<3, float>() &&
                  fits_argument_space<4, float>() && fits_argument_space<5, float>() &&
                  fits_argument_space<2, double>() && fits_argument_space<5, double>(),
              "tensor table + hyper-parameters exceed the 4 KiB kernel-argument space");
static_assert(sizeof(Hyper<double>) <= kHyperReserve, "raise kHyperReserve");

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

// ---- per-call helpers ------------------------------------------------------------------------
// Grad unscaling, g / grad_scale as the reference writes it, correctly rounded whatever the build's
// -prec-div setting.
__device__ __forceinline__ float unscale(float g, float scale) { return __fdiv_rn(g, scale); }
__device__ __forceinline__ double unscale(double g, double scale) { return g / scale; }

__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// The StepParams of table slot `slot`.
template <typename Meta, typename opmath_t>
__device__ __forceinline__ StepParams<opmath_t> tensor_step_params(const Meta& meta, const Hyper<opmath_t>& h,
                                                                   int slot) {
  if (!h.device_steps && h.lr_ptr == nullptr) {
    StepParams<opmath_t> p = h.hp;
    p.step_size = meta.step_size[slot];
    p.bc2_sqrt = meta.bc2_sqrt[slot];
    return p;
  }
  const double lr = call_lr(h);
  const double step = h.device_steps ? static_cast<double>(*meta.step_ptr[slot]) : 1.0;
  return bregman::make_step_params<opmath_t>(h.kind, lr, h.beta1, h.beta2, h.eps, h.delta, h.lamda_l1, h.lamda_group,
                                             step);
}

// The lr of this call: the device scalar (capturable) or the host value.
template <typename opmath_t>
__device__ __forceinline__ double call_lr(const Hyper<opmath_t>& h) {
  if (h.lr_ptr == nullptr) return h.lr;
  return h.lr_is_double ? *static_cast<const double*>(h.lr_ptr)
                        : static_cast<double>(*static_cast<const float*>(h.lr_ptr));
}

// Shared host-side table filling: addresses, sizes and step constants of tensor i.
template <int Depth, typename scalar_t, typename opmath_t, typename In>
__host__ void fill_slot(TensorListMeta<Depth, opmath_t>& meta, int slot, int64_t i, const In& in) {
  meta.ptrs[kParam][slot] = in.params[i].data_ptr();
  meta.ptrs[kGrad][slot] = in.grads[i].data_ptr();
  if constexpr (Depth >= 3) meta.ptrs[kDual][slot] = in.duals[i].data_ptr();
  if constexpr (Depth >= 4) meta.ptrs[kExpAvg][slot] = in.exp_avgs[i].data_ptr();
  if constexpr (Depth >= 5) meta.ptrs[kExpAvgSq][slot] = in.exp_avg_sqs[i].data_ptr();
  meta.numel[slot] = in.params[i].numel();
  meta.group_size[slot] = in.group_sizes.empty() ? 1 : in.group_sizes[i];
  meta.tensor_index[slot] = static_cast<int32_t>(i);
  if (in.device_mode()) {
    meta.step_ptr[slot] = in.device_steps[i].template data_ptr<float>();
    meta.step_size[slot] = opmath_t(0);
    meta.bc2_sqrt[slot] = opmath_t(1);
  } else {
    meta.step_ptr[slot] = nullptr;
    const auto p = bregman::make_step_params<opmath_t>(in.kind, in.lr, in.beta1, in.beta2, in.eps, in.delta,
                                                       in.lamda_l1, in.lamda_group, in.host_steps[i]);
    meta.step_size[slot] = p.step_size;
    meta.bc2_sqrt[slot] = p.bc2_sqrt;
  }
}

template <typename opmath_t, typename In>
__host__ Hyper<opmath_t> make_hyper(const In& in) {
  Hyper<opmath_t> h;
  h.hp = bregman::make_step_params<opmath_t>(in.kind, in.lr, in.beta1, in.beta2, in.eps, in.delta, in.lamda_l1,
                                             in.lamda_group, 1.0);
  h.lr = in.lr;
  h.beta1 = in.beta1;
  h.beta2 = in.beta2;
  h.eps = in.eps;
  h.delta = in.delta;
  h.lamda_l1 = in.lamda_l1;
  h.lamda_group = in.lamda_group;
  h.lr_ptr = in.lr_tensor ? in.lr_tensor->data_ptr() : nullptr;
  h.lr_is_double = in.lr_tensor && in.lr_tensor->scalar_type() == at::kDouble;
  h.grad_scale = in.grad_scale ? in.grad_scale->template data_ptr<float>() : nullptr;
  h.found_inf = in.found_inf ? in.found_inf->template data_ptr<float>() : nullptr;
  h.counts = reinterpret_cast<unsigned long long*>(in.counts.template data_ptr<int64_t>());
  h.kind = in.kind;
  h.reg = in.reg;
  h.device_steps = in.device_mode();
  return h;
}

}  // namespace bregman_cuda
