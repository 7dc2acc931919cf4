// Argument checks at the boundary of the fused ops, shared by the CPU op (csrc/cpu/fused_step.cpp)
// and the CUDA ops (csrc/cuda/ops_cuda.cpp), parameterised by the device the op's kernels run on.
//
// Every message starts with the op's name and names the bad argument (with its index) and what is
// expected. The ops run all checks before touching anything: a call that fails changes nothing.
// What differs between the ops stays with them and uses the pieces below: where the step counts may
// live (check_step_count), the dtypes the kernels read grad_scale / found_inf in
// (check_scalar_tensor), and the CUDA-only arguments (the capturable op's lr and counts).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "bregman_math.h"
#include "flat_layout.h"
#include "grad_dtypes.h"
#include "moment_codes.h"
#include "step_tensors.h"

namespace bregman {

// The op being checked: its registered name (the prefix of every message) and the device type its
// kernels run on (params[0] must be there, every other tensor on params[0]'s device).
struct OpBoundary {
  const char* op;               // e.g. "bregman_fused.fused_step"
  c10::DeviceType device_type;  // c10::DeviceType::CPU or c10::DeviceType::CUDA
};

namespace op_checks_detail {

// "0 (LinBreg), 1 (AdaBreg) or 2 (ProxSGD)": the valid codes, written from the enums.
template <typename Code, typename NameOf>
std::string code_list(Code last, NameOf name_of) {
  std::string out;
  const int64_t n = static_cast<int64_t>(last);
  for (int64_t c = 0; c <= n; ++c) {
    if (c > 0) out += c == n ? " or " : ", ";
    out += std::to_string(c) + " (" + name_of(static_cast<Code>(c)) + ")";
  }
  return out;
}

}  // namespace op_checks_detail

inline void check_list_len(const OpBoundary& b, const char* name, size_t got, size_t expected, const char* why) {
  TORCH_CHECK(got == expected, b.op, ": ", name, " must hold ", expected, " tensors (", why, "), got ", got);
}

// The codes checked and the scalar arguments packed: the only place that reads them one by one.
inline StepHyper make_step_hyper(const OpBoundary& b, int64_t kind_code, int64_t reg_code, const StepTensors& t,
                                 double lr, double beta1, double beta2, double eps, double delta, double lamda_l1,
                                 double lamda_group) {
  using op_checks_detail::code_list;
  TORCH_CHECK(kind_code >= 0 && kind_code <= static_cast<int64_t>(kLastKind), b.op, ": kind must be ",
              code_list(kLastKind, kind_name), ", got ", kind_code);
  TORCH_CHECK(reg_code >= 0 && reg_code <= static_cast<int64_t>(kLastReg), b.op, ": reg must be ",
              code_list(kLastReg, reg_name), ", got ", reg_code);
  StepHyper h;
  h.kind = static_cast<Kind>(kind_code);
  h.reg = static_cast<Reg>(reg_code);
  h.momentum = h.kind == Kind::LinBreg && !t.exp_avgs.empty();
  if (!t.exp_avgs.empty() && t.exp_avgs[0].defined()) {
    const at::ScalarType m = t.exp_avgs[0].scalar_type();
    h.moments = m == at::kBFloat16 ? Moments::Bf16 : m == at::kChar ? Moments::Int8 : Moments::Fp32;
  }
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.delta = delta;
  h.lamda_l1 = lamda_l1;
  h.lamda_group = lamda_group;
  return h;
}

// How many tensors each list holds for the call's optimizer.
inline void check_list_lengths(const OpBoundary& b, Kind kind, const StepTensors& t) {
  const size_t n = t.size();
  check_list_len(b, "grads", t.grads.size(), n, "one per param");
  check_list_len(b, "steps", t.steps.size(), n, "one per param");
  check_list_len(b, "group_sizes", t.group_sizes.size(), n, "one per param");
  if (kind == Kind::ProxSGD) {
    check_list_len(b, "duals", t.duals.size(), 0, "ProxSGD has no dual variable");
    check_list_len(b, "exp_avgs", t.exp_avgs.size(), 0, "ProxSGD has no momentum");
    check_list_len(b, "exp_avg_sqs", t.exp_avg_sqs.size(), 0, "only AdaBreg has exp_avg_sqs");
  } else if (kind == Kind::LinBreg) {
    check_list_len(b, "duals", t.duals.size(), n, "one per param");
    TORCH_CHECK(t.exp_avgs.empty() || t.exp_avgs.size() == n, b.op,
                ": exp_avgs must hold 0 tensors (LinBreg without momentum) or one per param (", n, "), got ",
                t.exp_avgs.size());
    check_list_len(b, "exp_avg_sqs", t.exp_avg_sqs.size(), 0, "only AdaBreg has exp_avg_sqs");
  } else {
    check_list_len(b, "duals", t.duals.size(), n, "one per param");
    check_list_len(b, "exp_avgs", t.exp_avgs.size(), n, "one per param");
    check_list_len(b, "exp_avg_sqs", t.exp_avg_sqs.size(), n, "one per param");
  }
}

// Tensor `name`[i]: defined, on `device`, of `dtype`, and walkable as flat memory. `param`: the
// tensor whose shape and memory order it must have (nullptr: it is a param itself).
inline void check_tensor(const OpBoundary& b, const char* name, size_t i, const at::Tensor& t, at::ScalarType dtype,
                         const at::Device& device, const at::Tensor* param, const char* dtype_why) {
  TORCH_CHECK(t.defined(), b.op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, b.op, ": ", name, "[", i, "] must be on the same device as params[",
              param == nullptr ? 0 : i, "] (", device, "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, b.op, ": ", name, "[", i, "] must have dtype ", dtype, " (", dtype_why,
              "), got ", t.scalar_type());
  if (param == nullptr) {
    TORCH_CHECK(is_flat(t), b.op, ": ", name, "[", i, "] must be contiguous or dense in another dim order (e.g. "
                "channels_last), got strides ", t.strides());
    return;
  }
  // shapes, not only sizes: a partner of another shape would be walked in another element order
  TORCH_CHECK(t.sizes() == param->sizes(), b.op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i,
              "] has shape ", param->sizes());
  TORCH_CHECK(has_flat_order_of(t, *param), b.op, ": ", name, "[", i, "] must have the strides of params[", i, "] ",
              param->strides(), " (walked in the same element order) or both be contiguous, got strides ",
              t.strides());
}

// grads[i]: like its param but in any of the param dtypes, whatever its param's (read as the
// reference's grads[i].to(state dtype), csrc/grad_dtypes.h [note: grad dtypes]).
inline void check_grad(const OpBoundary& b, size_t i, const at::Tensor& g, const at::Device& device,
                       const at::Tensor& param) {
  TORCH_CHECK(g.defined(), b.op, ": grads[", i, "] is undefined");
  TORCH_CHECK(is_param_dtype(g.scalar_type()), b.op, ": grads[", i, "] must have dtype float32, float64, bfloat16 "
              "or float16 (any of them, whatever params[", i, "]'s), got ", g.scalar_type());
  check_tensor(b, "grads", i, g, g.scalar_type(), device, &param, "");
}

// params[0] decides the device and dtype of the call; every param must share them.
inline void check_params(const OpBoundary& b, const StepTensors& t) {
  const at::Tensor& first = t.params[0];
  TORCH_CHECK(first.defined(), b.op, ": params[0] is undefined");
  TORCH_CHECK(first.device().type() == b.device_type, b.op, ": params[0] must be a ",
              c10::DeviceTypeName(b.device_type), " tensor, got one on ", first.device());
  const at::ScalarType dtype = first.scalar_type();
  TORCH_CHECK(is_param_dtype(dtype), b.op, ": params[0] has dtype ", dtype,
              "; supported: float32, float64, bfloat16, float16");
  for (size_t i = 0; i < t.size(); ++i) {
    check_tensor(b, "params", i, t.params[i], dtype, first.device(), nullptr,
                 "all params of one call share params[0]'s dtype; a model converted after its first step? "
                 "opt.load_state_dict(opt.state_dict()) re-buckets its params");
  }
}

// Row maps: group_sizes[i] rows of whole consecutive memory; element-wise maps: 1.
inline void check_group_sizes(const OpBoundary& b, Reg reg, const StepTensors& t) {
  for (size_t i = 0; i < t.size(); ++i) {
    const at::Tensor& p = t.params[i];
    const int64_t numel = p.numel();
    const int64_t n = t.group_sizes[i];
    if (is_row_reg(reg)) {
      TORCH_CHECK(numel == 0 || (n >= 1 && numel % n == 0), b.op, ": group_sizes[", i, "] = ", n,
                  " must be >= 1 and divide params[", i, "].numel() = ", numel);
      TORCH_CHECK(groups_are_blocks(p, n), b.op, ": params[", i, "] with strides ", p.strides(),
                  " does not hold its groups of ", n, " elements as consecutive memory (the row maps need that)");
    } else {
      TORCH_CHECK(n == 1, b.op, ": group_sizes[", i, "] must be 1 for an element-wise regularizer, got ", n);
    }
  }
}

// Compact moments (bregman_fused/backends/moments.py): bfloat16, or int8 m / uint8 s codes of contiguous
// params with float32 block scales of shape (rows, ceil(row length / kMomentBlock)).
inline void check_compact_moments(const OpBoundary& b, const StepHyper& h, const StepTensors& t) {
  const at::Device device = t.params[0].device();
  TORCH_CHECK(t.params[0].scalar_type() != at::kDouble, b.op, ": ", moments_name(h.moments),
              " moments are for float32/bfloat16/float16 params; float64 params keep float64 moments");
  const bool int8 = h.moments == Moments::Int8;
  const size_t n_scales = int8 ? t.size() : 0;
  check_list_len(b, "exp_avg_scales", t.exp_avg_scales.size(), n_scales, "one per 8-bit moment");
  check_list_len(b, "exp_avg_sq_scales", t.exp_avg_sq_scales.size(), t.exp_avg_sqs.empty() ? 0 : n_scales,
                 "one per 8-bit moment");
  auto check_list = [&](const char* name, at::TensorList list, at::ScalarType dtype, const char* scale_name,
                        at::TensorList scales) {
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& p = t.params[i];
      check_tensor(b, name, i, list[i], dtype, device, &p, "the format of exp_avgs[0]: one format per call");
      if (!int8) continue;
      TORCH_CHECK(p.dim() >= 1 && p.is_contiguous() && list[i].is_contiguous(), b.op, ": ", name, "[", i,
                  "]: 8-bit moments need a contiguous param of at least one dim (blocks follow dim-0 rows)");
      const int64_t rows = p.size(0);
      // from the shape, not numel/rows: a shard may hold 0 rows of a wide param (FSDP2, few rows)
      const int64_t row_len = c10::multiply_integers(p.sizes().slice(1));
      const int64_t blocks = (row_len + kMomentBlock - 1) / kMomentBlock;
      const at::Tensor& sc = scales[i];
      TORCH_CHECK(sc.defined() && sc.device() == device && sc.scalar_type() == at::kFloat && sc.is_contiguous() &&
                      sc.dim() == 2 && sc.size(0) == rows && sc.size(1) == blocks,
                  b.op, ": ", scale_name, "[", i, "] must be a contiguous float32 tensor of shape [", rows, ", ",
                  blocks, "] on ", device, " (one scale per block of ", kMomentBlock, " elements of each row)");
    }
  };
  check_list("exp_avgs", t.exp_avgs, int8 ? at::kChar : at::kBFloat16, "exp_avg_scales", t.exp_avg_scales);
  check_list("exp_avg_sqs", t.exp_avg_sqs, int8 ? at::kByte : at::kBFloat16, "exp_avg_sq_scales", t.exp_avg_sq_scales);
}

// Every list and tensor of the call but the step counts (check_step_count: where they live is the
// op's choice). The params' device and dtype come from params[0].
inline void check_step_tensors(const OpBoundary& b, const StepHyper& h, const StepTensors& t) {
  check_list_lengths(b, h.kind, t);
  if (t.size() == 0) return;
  check_params(b, t);
  const at::Device device = t.params[0].device();
  const at::ScalarType dtype = t.params[0].scalar_type();
  for (size_t i = 0; i < t.size(); ++i) check_grad(b, i, t.grads[i], device, t.params[i]);
  check_group_sizes(b, h.reg, t);
  const at::ScalarType states_dtype = state_dtype(dtype);
  auto check_states = [&](const char* name, at::TensorList list) {
    for (size_t i = 0; i < list.size(); ++i) {
      check_tensor(b, name, i, list[i], states_dtype, device, &t.params[i],
                   "optimizer states are float32, float64 for float64 params");
    }
  };
  check_states("duals", t.duals);
  if (h.moments == Moments::Fp32) {
    check_states("exp_avgs", t.exp_avgs);
    check_states("exp_avg_sqs", t.exp_avg_sqs);
    check_list_len(b, "exp_avg_scales", t.exp_avg_scales.size(), 0, "only 8-bit moments have block scales");
    check_list_len(b, "exp_avg_sq_scales", t.exp_avg_sq_scales.size(), 0, "only 8-bit moments have block scales");
  } else {
    check_compact_moments(b, h, t);
  }
}

// steps[i]: a one-element float32 tensor on `device` (`where`: why there, for the message).
inline void check_step_count(const OpBoundary& b, size_t i, const at::Tensor& step, const at::Device& device,
                             const char* where) {
  TORCH_CHECK(step.defined(), b.op, ": steps[", i, "] is undefined");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.numel() == 1, b.op, ": steps[", i,
              "] must be a float32 tensor with one element, got ", step.scalar_type(), " with ", step.numel(),
              " elements");
  TORCH_CHECK(step.device() == device, b.op, ": steps[", i, "] must be on ", device, " (", where, "), got ",
              step.device());
}

// A one-element tensor argument (grad_scale, found_inf, the capturable op's lr) on `device`, of a
// dtype the kernels read (`dtype_ok`, described by `dtypes` in the message).
inline void check_scalar_tensor(const OpBoundary& b, const char* name, const at::Tensor& t, const at::Device& device,
                                bool (*dtype_ok)(at::ScalarType), const char* dtypes) {
  TORCH_CHECK(t.defined(), b.op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == device, b.op, ": ", name, " must be on the params' device (", device, "), got ",
              t.device());
  TORCH_CHECK(t.numel() == 1, b.op, ": ", name, " must hold one element, got ", t.numel());
  TORCH_CHECK(dtype_ok(t.scalar_type()), b.op, ": ", name, " must be a ", dtypes, " tensor, got ", t.scalar_type());
}

inline void check_scalar_tensor(const OpBoundary& b, const char* name, const std::optional<at::Tensor>& t,
                                const at::Device& device, bool (*dtype_ok)(at::ScalarType), const char* dtypes) {
  if (t.has_value()) check_scalar_tensor(b, name, *t, device, dtype_ok, dtypes);
}

inline bool is_float32(at::ScalarType t) { return t == at::kFloat; }
inline bool is_float32_or_64(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }
inline bool is_floating(at::ScalarType t) { return at::isFloatingType(t); }

}  // namespace bregman
