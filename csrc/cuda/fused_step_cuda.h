// Host-side interface between the op bindings (ops_cuda.cpp, plain C++) and the kernel launchers
// (elementwise.cu, row_group.cu, steps.cu, compiled by nvcc). Only ATen types cross this boundary.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <vector>

#include "bregman_math.h"

namespace bregman_cuda {

// Everything one fused_step call needs, already checked by ops_cuda.cpp (devices, dtypes,
// contiguity, list lengths). The lists are borrowed from the op's arguments for the call only.
struct StepInputs {
  bregman::Kind kind = bregman::Kind::LinBreg;
  bregman::Reg reg = bregman::Reg::None;
  bool momentum = false;  // LinBreg: exp_avgs non-empty

  at::TensorList params, grads, duals, exp_avgs, exp_avg_sqs;
  c10::ArrayRef<int64_t> group_sizes;

  // Step counts. Exactly one of the two modes is used:
  //  - host mode:   host_steps[i] = t of tensor i after this step's increment (read from CPU steps);
  //                 the bias corrections are computed on the host in double (make_step_params).
  //  - device mode: device_steps[i] = 0-dim float32 on the params' device, ALREADY incremented by
  //                 launch_increment_steps; the kernels read t and compute the corrections in-kernel.
  std::vector<double> host_steps;
  at::TensorList device_steps;

  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, delta = 1, lamda_l1 = 0, lamda_group = 0;
  // capturable: lr as a 0-dim float32/float64 device tensor (then `lr` above is ignored)
  const at::Tensor* lr_tensor = nullptr;
  const at::Tensor* grad_scale = nullptr;  // 0-dim float32 on the device, or nullptr
  const at::Tensor* found_inf = nullptr;   // 0-dim float32 on the device, or nullptr

  at::Tensor counts;  // int64 [len(params)] on the device, zero-filled by the caller

  bool device_mode() const { return host_steps.empty() && !device_steps.empty(); }
};

// Element-wise regularizers (None / L1 / L1Pos): multi_tensor_apply over 64Ki-element chunks.
void launch_elementwise(const StepInputs& in);

// Row regularizers (Group / SparseGroup): blocks or sub-warp groups own whole rows.
void launch_row_group(const StepInputs& in);

// steps[i] += (found_inf is null or *found_inf == 0) ? 1 : 0, on the device, no host read.
void launch_increment_steps(at::TensorList steps, const at::Tensor* found_inf);

}  // namespace bregman_cuda
