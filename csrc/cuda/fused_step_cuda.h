// Host-side interface between the op bindings (ops_cuda.cpp, plain C++) and the kernel launchers
// (elementwise.cu, row_group.cu, moments_8bit.cu, compiled by nvcc). Only ATen types cross this boundary.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

#include "bregman_math.h"
#include "step_tensors.h"

namespace bregman_cuda {

// Everything one fused_step call needs, already checked by ops_cuda.cpp (devices, dtypes,
// layouts, list lengths). The lists are borrowed from the op's arguments for the call only.
struct StepInputs {
  bregman::StepHyper hyper;      // codes and scalars; hyper.lr is unused when lr_tensor is set
  bregman::StepTensors tensors;  // the op's lists

  // Step counts. Exactly one of the two modes is used:
  // Both hold the count of this step (ops_cuda.cpp [note: step counts]).
  //  - host mode:   host_steps[i] = t of tensor i after the op's increment of the CPU counters; the
  //                 bias corrections are computed on the host in double (make_step_params).
  //  - device mode: tensors.steps[i] = 0-dim float32 on the params' device; the kernels read t and
  //                 compute the corrections in-kernel.
  bool device_steps = false;
  std::vector<double> host_steps;

  // capturable: lr as a 0-dim float32/float64 device tensor (then hyper.lr is ignored)
  const at::Tensor* lr_tensor = nullptr;
  const at::Tensor* grad_scale = nullptr;  // 0-dim float32 on the device, or nullptr
  const at::Tensor* found_inf = nullptr;   // 0-dim float32 on the device, or nullptr

  at::Tensor counts;  // int64 [len(params)] on the device, zero-filled by the caller

  // The kernels of one launch series read grads of one dtype (csrc/grad_dtypes.h [note: grad
  // dtypes]): a call whose grads mix the param dtype with float32 (float16/bfloat16 params) runs one
  // series per grad dtype, each over the tensors whose grad has it (mixed_grads: skip the others).
  at::ScalarType grad_dtype = at::kFloat;
  bool mixed_grads = false;

  bool in_series(int64_t i) const { return !mixed_grads || tensors.grads[i].scalar_type() == grad_dtype; }
};

// All three launch the tensors of one series (StepInputs::in_series).
// Element-wise regularizers (None / L1 / L1Pos) with fp32 or bf16 moments: multi_tensor_apply over
// 64Ki-element chunks.
void launch_elementwise(const StepInputs& in);

// Row regularizers (Group / SparseGroup): blocks or sub-warp groups own whole rows. With 8-bit
// moments only θ, from the duals launch_moments_8bit wrote (run that first).
void launch_row_group(const StepInputs& in);

// 8-bit moments (hyper.moments == Moments::Int8), any regularizer: a warp per 256-element block of a
// dim-0 row updates the dual and the moment codes and scales, and θ for the element-wise maps.
void launch_moments_8bit(const StepInputs& in);

}  // namespace bregman_cuda
