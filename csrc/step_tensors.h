// The tensor lists of one fused_step call, as the op receives them: checked at the op boundary
// (csrc/op_checks.h) and handed down whole with the call's scalars (bregman::StepHyper). Borrowed
// from the op's arguments for the call only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <cstdint>

namespace bregman {

struct StepTensors {
  at::TensorList params;       // θ, updated in place
  at::TensorList grads;        // in any of the param dtypes (csrc/grad_dtypes.h)
  at::TensorList duals;        // v (none for ProxSGD)
  at::TensorList exp_avgs;     // momentum buffers (LinBreg, may be empty) or exp_avg (AdaBreg)
  at::TensorList exp_avg_sqs;  // AdaBreg only
  at::TensorList steps;        // 0-dim float32 step counts (CPU ones incremented by the op)
  at::IntArrayRef group_sizes; // row length n per param (1 for the element-wise maps)

  size_t size() const { return params.size(); }
};

}  // namespace bregman
