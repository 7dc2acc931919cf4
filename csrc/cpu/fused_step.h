// The CPU implementation of the bregman_fused::fused_step op (schema: csrc/ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace bregman::cpu {

at::Tensor fused_step(int64_t kind, at::TensorList params, at::TensorList grads, at::TensorList duals,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                      at::TensorList exp_avg_sq_scales, at::TensorList steps,
                      at::IntArrayRef group_sizes, double lr, double beta1, double beta2, double eps,
                      double delta, int64_t reg, double lamda_l1, double lamda_group,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

}  // namespace bregman::cpu
