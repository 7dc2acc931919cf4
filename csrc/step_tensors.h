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
  at::TensorList exp_avgs;     // momentum buffers (LinBreg, may be empty) or exp_avg (AdaBreg): in the
                               // state dtype, bfloat16, or int8 codes (StepHyper::moments)
  at::TensorList exp_avg_sqs;  // AdaBreg only; the same format (uint8 codes for 8-bit)
  at::TensorList steps;        // 0-dim float32 step counts (CPU ones incremented by the op)
  at::IntArrayRef group_sizes; // row length n per param (1 for the element-wise maps)
  at::TensorList exp_avg_scales;     // 8-bit moments: the block scales of exp_avgs (else empty)
  at::TensorList exp_avg_sq_scales;  // 8-bit moments: the block scales of exp_avg_sqs (else empty)

  size_t size() const { return params.size(); }
};

}  // namespace bregman
