// bregman_fused::fused_step on CPU tensors: argument checks at the boundary, per-tensor step
// bookkeeping, then one call of the multi-tensor kernel (kernel.h) for the whole bucket.
#include "fused_step.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/count_nonzero.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "flat_layout.h"
#include "work.h"

namespace bregman::cpu {
namespace {

constexpr const char* kOp = "bregman_fused.fused_step: ";

// flash-attention style boundary checks: every message names the argument and the index.
void check_list_len(const char* name, size_t got, size_t expected, const char* why) {
  TORCH_CHECK(got == expected, kOp, name, " must hold ", expected, " tensors (", why, "), got ", got);
}

// `param`: the tensor whose shape and memory order t must have (nullptr: t is a param itself).
void check_tensor(const char* name, size_t i, const at::Tensor& t, at::ScalarType dtype, const at::Tensor* param,
                  const char* dtype_why) {
  TORCH_CHECK(t.defined(), kOp, name, "[", i, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), kOp, name, "[", i, "] must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, kOp, name, "[", i, "] must have dtype ", dtype, " (", dtype_why, "), got ",
              t.scalar_type());
  TORCH_CHECK(param == nullptr || t.sizes() == param->sizes(), kOp, name, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", param->sizes());
  if (param == nullptr) {
    TORCH_CHECK(is_flat(t), kOp, name, "[", i, "] must be contiguous or dense in another dim order (e.g. "
                "channels_last), got strides ", t.strides());
  } else {
    TORCH_CHECK(has_flat_order_of(t, *param), kOp, name, "[", i, "] must have the strides of params[", i, "] ",
                param->strides(), " (walked in the same element order) or both be contiguous, got strides ",
                t.strides());
  }
}

void check_state_list(const char* name, at::TensorList list, at::TensorList params, at::ScalarType state_dtype) {
  for (size_t i = 0; i < list.size(); ++i) {
    check_tensor(name, i, list[i], state_dtype, &params[i],
                 "optimizer states are float32, float64 for float64 params");
  }
}

void check_scalar_tensor(const char* name, const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->defined(), kOp, name, " is undefined");
  TORCH_CHECK(t->device().is_cpu(), kOp, name, " must be a CPU tensor, got one on ", t->device());
  TORCH_CHECK(t->numel() == 1, kOp, name, " must hold one element, got ", t->numel());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), kOp, name, " must be a floating-point tensor, got ",
              t->scalar_type());
}

// [note: streaming stores] θ is write-only in the Bregman steps (it is derived from v), so
// non-temporal stores skip the read-for-ownership of its cache lines: 4 of the 20 bytes per
// element that LinBreg would otherwise move for a fp32 θ. That only pays when θ does not fit in
// the caches anyway; for small buckets the cached θ is what the next forward pass reads.
// BREGMAN_FUSED_CPU_STREAM=1|0 forces them on/off (read once).
bool use_streaming_stores(int64_t theta_bytes) {
  static const int mode = [] {
    const char* env = std::getenv("BREGMAN_FUSED_CPU_STREAM");
    if (env == nullptr || std::strcmp(env, "") == 0 || std::strcmp(env, "auto") == 0) return -1;
    return std::strcmp(env, "0") == 0 ? 0 : 1;
  }();
  if (mode >= 0) return mode == 1;
  constexpr int64_t kStreamThresholdBytes = int64_t(8) << 20;
  return theta_bytes >= kStreamThresholdBytes;
}

template <typename scalar_t>
void launch(Kind kind, Reg reg, at::TensorList params, at::TensorList grads, at::TensorList duals,
            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const std::vector<double>& step_values,
            at::IntArrayRef group_sizes, double lr, double beta1, double beta2, double eps, double delta,
            double lamda_l1, double lamda_group, const std::optional<at::Tensor>& grad_scale, int64_t* counts) {
  using T = opmath_t<scalar_t>;
  Work<T> w;
  w.kind = kind;
  w.reg = reg;
  w.momentum = kind == Kind::LinBreg && !exp_avgs.empty();
  w.has_scale = grad_scale.has_value();
  // the reference divides by grad_scale.to(state dtype): one rounding of the scale to T
  w.scale = w.has_scale ? static_cast<T>(grad_scale->item<double>()) : T(1);
  int64_t theta_bytes = 0;
  w.tensors.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& t = w.tensors[i];
    t.theta = params[i].data_ptr();
    t.grad = grads[i].data_ptr();
    if (!duals.empty()) t.v = duals[i].data_ptr<T>();
    if (!exp_avgs.empty()) t.m = exp_avgs[i].data_ptr<T>();
    if (!exp_avg_sqs.empty()) t.s = exp_avg_sqs[i].data_ptr<T>();
    t.numel = params[i].numel();
    t.n = is_row_reg(reg) ? group_sizes[i] : 1;
    t.hp = make_step_params<T>(kind, lr, beta1, beta2, eps, delta, lamda_l1, lamda_group, step_values[i]);
    t.row_thr = static_cast<T>(row_threshold(kind, lr, lamda_group, t.n));
    theta_bytes += t.numel * static_cast<int64_t>(sizeof(scalar_t));
  }
  // ProxSGD reads θ before writing it: its lines are in cache already, and a non-temporal store
  // would only evict them (measured: ~25 % slower on a 64 M-element fp32 list)
  w.stream = kind != Kind::ProxSGD && use_streaming_stores(theta_bytes);
  run_fused_step<scalar_t>(w, counts);
}

}  // namespace

at::Tensor fused_step(int64_t kind_code, at::TensorList params, at::TensorList grads, at::TensorList duals,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                      at::IntArrayRef group_sizes, double lr, double beta1, double beta2, double eps,
                      double delta, int64_t reg_code, double lamda_l1, double lamda_group,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  // ---- checks: nothing is touched before all of them pass -------------------------------------
  TORCH_CHECK(kind_code >= 0 && kind_code <= 2, kOp, "kind must be 0 (LinBreg), 1 (AdaBreg) or 2 (ProxSGD), got ",
              kind_code);
  TORCH_CHECK(reg_code >= 0 && reg_code <= 4, kOp,
              "reg must be 0 (none), 1 (L1), 2 (L1Pos), 3 (Group) or 4 (SparseGroup), got ", reg_code);
  const auto kind = static_cast<Kind>(kind_code);
  const auto reg = static_cast<Reg>(reg_code);
  const size_t n = params.size();
  check_list_len("grads", grads.size(), n, "one per param");
  check_list_len("steps", steps.size(), n, "one per param");
  check_list_len("group_sizes", group_sizes.size(), n, "one per param");
  if (kind == Kind::ProxSGD) {
    check_list_len("duals", duals.size(), 0, "ProxSGD has no dual variable");
    check_list_len("exp_avgs", exp_avgs.size(), 0, "ProxSGD has no momentum");
    check_list_len("exp_avg_sqs", exp_avg_sqs.size(), 0, "only AdaBreg has exp_avg_sqs");
  } else if (kind == Kind::LinBreg) {
    check_list_len("duals", duals.size(), n, "one per param");
    TORCH_CHECK(exp_avgs.empty() || exp_avgs.size() == n, kOp,
                "exp_avgs must hold 0 tensors (LinBreg without momentum) or one per param (", n, "), got ",
                exp_avgs.size());
    check_list_len("exp_avg_sqs", exp_avg_sqs.size(), 0, "only AdaBreg has exp_avg_sqs");
  } else {
    check_list_len("duals", duals.size(), n, "one per param");
    check_list_len("exp_avgs", exp_avgs.size(), n, "one per param");
    check_list_len("exp_avg_sqs", exp_avg_sqs.size(), n, "one per param");
  }
  check_scalar_tensor("grad_scale", grad_scale);
  check_scalar_tensor("found_inf", found_inf);
  if (n == 0) return at::zeros({0}, at::kLong);

  const at::ScalarType dtype = params[0].defined() ? params[0].scalar_type() : at::kFloat;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              "params[0] has dtype ", dtype, "; supported: float32, float64, bfloat16, float16");
  const at::ScalarType state_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  for (size_t i = 0; i < n; ++i) {
    check_tensor("params", i, params[i], dtype, nullptr, "all params of one call share params[0]'s dtype");
  }
  for (size_t i = 0; i < n; ++i) {
    check_tensor("grads", i, grads[i], dtype, &params[i], "grads have their param's dtype");
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1, kOp,
                "steps[", i, "] must be a float32 CPU tensor with one element");
    const int64_t numel = params[i].numel();
    const int64_t gs = group_sizes[i];
    if (is_row_reg(reg)) {
      TORCH_CHECK(numel == 0 || (gs >= 1 && numel % gs == 0), kOp, "group_sizes[", i, "] = ", gs,
                  " must be >= 1 and divide params[", i, "].numel() = ", numel);
      TORCH_CHECK(groups_are_blocks(params[i], gs), kOp, "params[", i, "] with strides ", params[i].strides(),
                  " does not hold its groups of ", gs, " elements as consecutive memory (the row maps need that)");
    } else {
      TORCH_CHECK(gs == 1, kOp, "group_sizes[", i, "] must be 1 for an element-wise regularizer, got ", gs);
    }
  }
  check_state_list("duals", duals, params, state_dtype);
  check_state_list("exp_avgs", exp_avgs, params, state_dtype);
  check_state_list("exp_avg_sqs", exp_avg_sqs, params, state_dtype);

  at::Tensor counts = at::zeros({static_cast<int64_t>(n)}, at::kLong);
  int64_t* counts_ptr = counts.data_ptr<int64_t>();

  // ---- AMP: an inf/NaN in the grads skips the step entirely (no param, state or step count) --
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    for (size_t i = 0; i < n; ++i) counts_ptr[i] = params[i].count_nonzero().item<int64_t>();
    return counts;
  }

  std::vector<double> step_values(n);
  for (size_t i = 0; i < n; ++i) {
    float* t = steps[i].data_ptr<float>();
    *t += 1.0f;  // as reference.py's steps[i] += 1 (a float32 add)
    step_values[i] = static_cast<double>(*t);
  }

  switch (dtype) {
    case at::kFloat:
      launch<float>(kind, reg, params, grads, duals, exp_avgs, exp_avg_sqs, step_values, group_sizes, lr, beta1,
                    beta2, eps, delta, lamda_l1, lamda_group, grad_scale, counts_ptr);
      break;
    case at::kDouble:
      launch<double>(kind, reg, params, grads, duals, exp_avgs, exp_avg_sqs, step_values, group_sizes, lr, beta1,
                     beta2, eps, delta, lamda_l1, lamda_group, grad_scale, counts_ptr);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(kind, reg, params, grads, duals, exp_avgs, exp_avg_sqs, step_values, group_sizes, lr,
                            beta1, beta2, eps, delta, lamda_l1, lamda_group, grad_scale, counts_ptr);
      break;
    case at::kHalf:
      launch<c10::Half>(kind, reg, params, grads, duals, exp_avgs, exp_avg_sqs, step_values, group_sizes, lr, beta1,
                        beta2, eps, delta, lamda_l1, lamda_group, grad_scale, counts_ptr);
      break;
    default:
      TORCH_CHECK(false, kOp, "unreachable dtype ", dtype);
  }
  return counts;
}

}  // namespace bregman::cpu
