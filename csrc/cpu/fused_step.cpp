// bregman_fused::fused_step on CPU tensors: argument checks at the boundary (csrc/op_checks.h),
// the per-tensor step counts added, then one call of the multi-tensor kernel (kernel.h) for the whole
// bucket (two when it mixes grads in the param dtype with float grads, csrc/grad_dtypes.h).
#include "fused_step.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/count_nonzero.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "grad_dtypes.h"
#include "op_checks.h"
#include "work.h"

namespace bregman::cpu {
namespace {

constexpr OpBoundary kOp{"bregman_fused.fused_step", c10::DeviceType::CPU};

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

// Compact moments (csrc/moment_codes.h): the stored tensors, the 8-bit block scales and row length,
// and the step count that seeds bf16's random bits (the reference's int(step), as uint32).
MomentWork compact_moments(const StepHyper& hyper, const StepTensors& t, size_t i, double step) {
  MomentWork mw;
  if (!t.exp_avgs.empty()) mw.m = t.exp_avgs[i].data_ptr();
  if (!t.exp_avg_sqs.empty()) mw.s = t.exp_avg_sqs[i].data_ptr();
  mw.step = static_cast<uint32_t>(static_cast<int64_t>(step));
  if (hyper.moments == Moments::Int8) {
    const at::Tensor& p = t.params[i];
    mw.row_len = p.numel() > 0 ? p.numel() / p.size(0) : 1;
    if (!t.exp_avg_scales.empty()) mw.m_scale = t.exp_avg_scales[i].data_ptr<float>();
    if (!t.exp_avg_sq_scales.empty()) mw.s_scale = t.exp_avg_sq_scales[i].data_ptr<float>();
  }
  return mw;
}

template <typename scalar_t>
void launch(const StepHyper& hyper, const StepTensors& t, const std::vector<double>& step_values,
            const std::optional<at::Tensor>& grad_scale, int64_t* counts) {
  using T = opmath_t<scalar_t>;
  // one kernel variant per grad dtype: grads in the param dtype (the usual case, one pass over the
  // whole bucket), and float grads of bf16/fp16 params (csrc/grad_dtypes.h [note: grad dtypes])
  Work<T> same;
  Work<T> wide;
  for (Work<T>* w : {&same, &wide}) {
    w->hyper = hyper;
    w->has_scale = grad_scale.has_value();
    // the reference divides by grad_scale.to(state dtype): one rounding of the scale to T
    w->scale = w->has_scale ? static_cast<T>(grad_scale->item<double>()) : T(1);
  }
  same.tensors.reserve(t.size());
  same.op_index.reserve(t.size());
  const at::ScalarType param_dtype = t.params[0].scalar_type();
  int64_t theta_bytes = 0;
  for (size_t i = 0; i < t.size(); ++i) {
    TensorWork<T> tw;
    tw.theta = t.params[i].data_ptr();
    tw.grad = t.grads[i].data_ptr();
    if (!t.duals.empty()) tw.v = t.duals[i].data_ptr<T>();
    const bool compact = hyper.moments != Moments::Fp32;
    if (!compact && !t.exp_avgs.empty()) tw.m = t.exp_avgs[i].data_ptr<T>();
    if (!compact && !t.exp_avg_sqs.empty()) tw.s = t.exp_avg_sqs[i].data_ptr<T>();
    tw.numel = t.params[i].numel();
    tw.n = is_row_reg(hyper.reg) ? t.group_sizes[i] : 1;
    tw.hp = make_step_params<T>(hyper, step_values[i], tw.n);
    theta_bytes += tw.numel * static_cast<int64_t>(sizeof(scalar_t));
    Work<T>& w = t.grads[i].scalar_type() == param_dtype ? same : wide;
    w.tensors.push_back(tw);
    w.op_index.push_back(static_cast<int64_t>(i));
    if (compact) w.moments.push_back(compact_moments(hyper, t, i, step_values[i]));
  }
  // ProxSGD reads θ before writing it: its lines are in cache already, and a non-temporal store
  // would only evict them (measured: ~25 % slower on a 64 M-element fp32 list). 8-bit moments walk
  // θ block by block, interleaved with the encoding of the block before (csrc/cpu/moment_sweep.h):
  // there non-temporal stores measured 15-45 % slower, and far slower where rows of a length that
  // is not a multiple of 8 misalign the blocks (a scalar peel at every block start).
  same.stream = wide.stream = hyper.kind != Kind::ProxSGD && hyper.moments != Moments::Int8 &&
                              use_streaming_stores(theta_bytes);
  if (!same.tensors.empty()) run_fused_step<scalar_t, scalar_t>(same, counts);
  if constexpr (!std::is_same_v<scalar_t, T>) {
    if (!wide.tensors.empty()) run_fused_step<scalar_t, T>(wide, counts);
  } else {
    TORCH_INTERNAL_ASSERT(wide.tensors.empty(), "grads in the state dtype of a float32/float64 param are its dtype");
  }
}

}  // namespace

at::Tensor fused_step(int64_t kind, at::TensorList params, at::TensorList grads, at::TensorList duals,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                      at::TensorList exp_avg_sq_scales, at::TensorList steps,
                      at::IntArrayRef group_sizes, double lr, double beta1, double beta2, double eps,
                      double delta, int64_t reg, double lamda_l1, double lamda_group,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  // ---- checks: nothing is touched before all of them pass -------------------------------------
  const StepTensors checked{params, grads,    duals,         exp_avgs,         exp_avg_sqs,
                            steps,  group_sizes, exp_avg_scales, exp_avg_sq_scales};
  const StepHyper hyper =
      make_step_hyper(kOp, kind, reg, checked, lr, beta1, beta2, eps, delta, lamda_l1, lamda_group);
  check_step_tensors(kOp, hyper, checked);
  const at::Device cpu(at::kCPU);
  for (size_t i = 0; i < checked.size(); ++i) {
    check_step_count(kOp, i, steps[i], cpu, "the CPU op counts steps on the host");
  }
  check_scalar_tensor(kOp, "grad_scale", grad_scale, cpu, is_floating, "floating-point");
  check_scalar_tensor(kOp, "found_inf", found_inf, cpu, is_floating, "floating-point");
  const size_t n = checked.size();
  if (n == 0) return at::zeros({0}, at::kLong);

  at::Tensor counts = at::zeros({static_cast<int64_t>(n)}, at::kLong);
  int64_t* counts_ptr = counts.data_ptr<int64_t>();

  // ---- AMP: an inf/NaN in the grads skips the step (no param, state or step count changes) -----
  // found_inf only reaches the op in capturable steps (the caller reads it once otherwise,
  // bregman_fused/backends/contract.py begin_step): report the unchanged θ's non-zeros
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    for (size_t i = 0; i < n; ++i) counts_ptr[i] = params[i].count_nonzero().item<int64_t>();
    return counts;
  }

  // grads of a dtype the kernels do not read are converted first (csrc/grad_dtypes.h)
  std::vector<at::Tensor> converted_grads;
  const StepTensors t = with_kernel_grads(checked, converted_grads);

  // the step counters live on the CPU: the op adds one to each, after every check passed (from
  // Python this add costs µs per 0-dim tensor; bregman_fused/backends/contract.py [note: who adds])
  // All adds first, then the reads, as the reference's foreach add: a counter shared by several
  // params (the functional API allows it) then reads the same count for each of them.
  std::vector<double> step_values(n);
  for (size_t i = 0; i < n; ++i) *steps[i].data_ptr<float>() += 1.0f;  // as the reference's float32 count
  for (size_t i = 0; i < n; ++i) step_values[i] = static_cast<double>(*steps[i].data_ptr<float>());

  switch (params[0].scalar_type()) {
    case at::kFloat:
      launch<float>(hyper, t, step_values, grad_scale, counts_ptr);
      break;
    case at::kDouble:
      launch<double>(hyper, t, step_values, grad_scale, counts_ptr);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(hyper, t, step_values, grad_scale, counts_ptr);
      break;
    case at::kHalf:
      launch<c10::Half>(hyper, t, step_values, grad_scale, counts_ptr);
      break;
    default:
      TORCH_CHECK(false, kOp.op, ": unreachable dtype ", params[0].scalar_type());
  }
  return counts;
}

}  // namespace bregman::cpu
