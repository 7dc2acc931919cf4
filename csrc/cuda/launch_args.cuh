// The per-call arguments of the CUDA kernels, passed by value next to the multi-tensor table
// (multi_tensor_apply.cuh): the call's scalars and codes, the host-made StepParams, and the
// addresses of the device scalars (lr, grad_scale, found_inf, counts). Built once per launch series
// on the host (make_launch_args); read in-kernel through the accessors below.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "bregman_math.h"
#include "fused_step_cuda.h"

namespace bregman_cuda {

using bregman::Kind;
using bregman::Reg;
using bregman::StepParams;

template <typename opmath_t>
struct LaunchArgs {
  StepParams<opmath_t> hp;    // host mode: made for step 1; step_size, bc2_sqrt, thr_row replaced per tensor
  bregman::StepHyper hyper;   // codes and raw scalars, for the in-kernel make_step_params (device mode)
  const void* lr_ptr;         // capturable: 0-dim device lr, nullptr otherwise
  const float* grad_scale;    // nullptr: no unscaling
  const float* found_inf;     // nullptr: never skip
  unsigned long long* counts; // int64 counts, one per tensor of the op call
  bool lr_is_double;
  bool device_steps;
};

template <typename opmath_t>
__host__ LaunchArgs<opmath_t> make_launch_args(const StepInputs& in) {
  LaunchArgs<opmath_t> a;
  a.hp = bregman::make_step_params<opmath_t>(in.hyper, /*step=*/1.0, /*n=*/1);
  a.hyper = in.hyper;
  a.lr_ptr = in.lr_tensor ? in.lr_tensor->data_ptr() : nullptr;
  a.lr_is_double = in.lr_tensor && in.lr_tensor->scalar_type() == at::kDouble;
  a.grad_scale = in.grad_scale ? in.grad_scale->data_ptr<float>() : nullptr;
  a.found_inf = in.found_inf ? in.found_inf->data_ptr<float>() : nullptr;
  a.counts = reinterpret_cast<unsigned long long*>(in.counts.data_ptr<int64_t>());
  a.device_steps = in.device_steps;
  return a;
}

// AMP overflow: the whole step is skipped (read on the device, no host sync).
__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// Grad unscaling, g / grad_scale as the reference writes it, correctly rounded whatever the build's
// -prec-div setting.
__device__ __forceinline__ float unscale(float g, float scale) { return __fdiv_rn(g, scale); }
__device__ __forceinline__ double unscale(double g, double scale) { return g / scale; }

// The lr of this call: the device scalar (capturable) or the host value.
template <typename opmath_t>
__device__ __forceinline__ double call_lr(const LaunchArgs<opmath_t>& a) {
  if (a.lr_ptr == nullptr) return a.hyper.lr;
  return a.lr_is_double ? *static_cast<const double*>(a.lr_ptr)
                        : static_cast<double>(*static_cast<const float*>(a.lr_ptr));
}

// The StepParams of table slot `slot` (Meta: a TensorListMeta): host mode takes the host-made
// constants and the slot's bias corrections; with the lr or the step count on the device, all of
// them are made in-kernel, in double, by the same make_step_params as on the host.
template <typename Meta, typename opmath_t>
__device__ __forceinline__ StepParams<opmath_t> tensor_step_params(const Meta& meta, const LaunchArgs<opmath_t>& a,
                                                                   int slot) {
  const int64_t n = meta.group_size[slot];
  if (!a.device_steps && a.lr_ptr == nullptr) {
    StepParams<opmath_t> p = a.hp;
    p.step_size = meta.step_size[slot];
    p.bc2_sqrt = meta.bc2_sqrt[slot];
    p.thr_row = bregman::make_thr_row<opmath_t>(a.hyper, n);
    return p;
  }
  bregman::StepHyper hyper = a.hyper;
  hyper.lr = call_lr(a);
  const double step = a.device_steps ? static_cast<double>(*meta.step_ptr[slot]) : 1.0;
  return bregman::make_step_params<opmath_t>(hyper, step, n);
}

}  // namespace bregman_cuda
