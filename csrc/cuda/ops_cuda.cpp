// CUDA bindings of the bregman_fused ops: argument checks, step-count handling and the choice of
// kernel. No math here (that is bregman_math.h) and no kernels (elementwise.cu, row_group.cu).
//
// Registers
//  - the CUDA kernel of `fused_step` (schema defined with TORCH_LIBRARY in csrc/ops.cpp), and
//  - the op `fused_step_capturable` (schema in the TORCH_LIBRARY_FRAGMENT below, CUDA only).
//
// [note: step counts] `fused_step` accepts its 0-dim float32 step tensors in either place:
//  - on the CPU (the optimizer's default): incremented here and the bias corrections computed on
//    the host in double with bregman::make_step_params. With found_inf given this needs ONE
//    device→host read of found_inf (a sync) to know whether to increment — the price of keeping
//    CPU steps; the update kernels still read found_inf themselves.
//  - on the params' device (what torch's _fused_adam does): a tiny kernel does
//    steps += (found_inf == 0) and the update kernels read the incremented count and compute the
//    bias corrections in-kernel (in double). No host read; use this with AMP.
// `fused_step_capturable` only takes device steps and a device lr, and writes into a preallocated
// `counts`, so a whole training step can be captured in a CUDA graph.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "bregman_math.h"
#include "flat_layout.h"
#include "fused_step_cuda.h"
#include "module_init.h"

namespace bregman_cuda {
namespace {

using bregman::Kind;
using bregman::Reg;

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::LinBreg:
      return "LinBreg";
    case Kind::AdaBreg:
      return "AdaBreg";
    default:
      return "ProxSGD";
  }
}

at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A state list (duals / exp_avgs / exp_avg_sqs): one opmath tensor per param, laid out like it.
void check_state_list(const char* name, at::TensorList list, at::TensorList params) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(t.defined(), name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == p.device(), name, "[", i, "] must be on the same device as params[", i, "] (", p.device(),
                "), got ", t.device());
    TORCH_CHECK(t.scalar_type() == opmath_dtype(p.scalar_type()), name, "[", i, "] must be ",
                opmath_dtype(p.scalar_type()), " for ", p.scalar_type(), " params, got ", t.scalar_type());
    // shapes, not only sizes: a partner of another shape would be walked in another element order
    TORCH_CHECK(t.sizes() == p.sizes(), name, "[", i, "] has shape ", t.sizes(), " but params[", i, "] has shape ",
                p.sizes());
    TORCH_CHECK(bregman::has_flat_order_of(t, p), name, "[", i, "] must have the strides of params[", i, "] ", p.strides(),
                " (walked in the same element order) or both be contiguous, got strides ", t.strides());
  }
}

void check_scalar_tensor(const char* name, const at::Tensor& t, const at::Device& device,
                         std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.numel() == 1, name, " must hold exactly one element, got ", t.numel());
  TORCH_CHECK(t.device() == device, name, " must be on the params' device (", device, "), got ", t.device());
  bool ok = false;
  for (auto d : dtypes) ok = ok || t.scalar_type() == d;
  TORCH_CHECK(ok, name, " must be float32", dtypes.size() > 1 ? " or float64" : "", ", got ", t.scalar_type());
}

struct Checked {
  Kind kind;
  Reg reg;
  bool momentum;  // LinBreg with momentum buffers
  bool device_steps;
};

// All the argument checks shared by both ops; every message names the bad argument.
Checked check_args(int64_t kind_code, at::TensorList params, at::TensorList grads, at::TensorList duals,
                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                   at::IntArrayRef group_sizes, int64_t reg_code, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, bool require_device_steps) {
  TORCH_CHECK(kind_code >= 0 && kind_code <= 2, "kind must be 0 (LinBreg), 1 (AdaBreg) or 2 (ProxSGD), got ",
              kind_code);
  TORCH_CHECK(reg_code >= 0 && reg_code <= 4,
              "reg must be 0 (none), 1 (L1), 2 (L1Pos), 3 (Group) or 4 (SparseGroup), got ", reg_code);
  const Kind kind = static_cast<Kind>(kind_code);
  const Reg reg = static_cast<Reg>(reg_code);
  const size_t n = params.size();
  TORCH_CHECK(n <= static_cast<size_t>(INT32_MAX), "too many params: ", n);

  TORCH_CHECK(grads.size() == n, "grads must have one tensor per param (", n, "), got ", grads.size());
  TORCH_CHECK(steps.size() == n, "steps must have one tensor per param (", n, "), got ", steps.size());
  TORCH_CHECK(group_sizes.size() == n, "group_sizes must have one entry per param (", n, "), got ",
              group_sizes.size());
  const bool has_dual = kind != Kind::ProxSGD;
  TORCH_CHECK(duals.size() == (has_dual ? n : 0), "duals must have ",
              has_dual ? "one tensor per param" : "no tensors", " for ", kind_name(kind), " (", has_dual ? n : 0,
              "), got ", duals.size());
  if (kind == Kind::AdaBreg) {
    TORCH_CHECK(exp_avgs.size() == n, "exp_avgs must have one tensor per param for AdaBreg (", n, "), got ",
                exp_avgs.size());
  } else if (kind == Kind::LinBreg) {
    TORCH_CHECK(exp_avgs.empty() || exp_avgs.size() == n,
                "exp_avgs (momentum buffers) must be empty or have one tensor per param for LinBreg (", n,
                "), got ", exp_avgs.size());
  } else {
    TORCH_CHECK(exp_avgs.empty(), "exp_avgs must be empty for ProxSGD, got ", exp_avgs.size());
  }
  TORCH_CHECK(exp_avg_sqs.size() == (kind == Kind::AdaBreg ? n : 0), "exp_avg_sqs must have ",
              kind == Kind::AdaBreg ? "one tensor per param" : "no tensors", " for ", kind_name(kind), ", got ",
              exp_avg_sqs.size());

  bool device_steps = require_device_steps;
  if (n > 0) {
    const at::Device device = params[0].device();
    const at::ScalarType dtype = params[0].scalar_type();
    TORCH_CHECK(device.is_cuda(), "params[0] must be a CUDA tensor, got ", device);
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                "params must be float32, float64, float16 or bfloat16, got ", dtype);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = params[i];
      const at::Tensor& g = grads[i];
      TORCH_CHECK(p.defined(), "params[", i, "] is undefined");
      TORCH_CHECK(p.device() == device, "params[", i, "] must be on the same device as params[0] (", device,
                  "), got ", p.device());
      TORCH_CHECK(p.scalar_type() == dtype, "params[", i, "] must have the dtype of params[0] (", dtype, "), got ",
                  p.scalar_type());
      TORCH_CHECK(bregman::is_flat(p), "params[", i, "] must be contiguous or dense in another dim order (e.g. "
                  "channels_last), got strides ", p.strides());
      TORCH_CHECK(g.defined(), "grads[", i, "] is undefined");
      TORCH_CHECK(g.device() == device, "grads[", i, "] must be on the same device as params[", i, "] (", device,
                  "), got ", g.device());
      TORCH_CHECK(g.scalar_type() == dtype, "grads[", i, "] must have the dtype of params[", i, "] (", dtype,
                  "), got ", g.scalar_type());
      TORCH_CHECK(g.sizes() == p.sizes(), "grads[", i, "] has shape ", g.sizes(), " but params[", i,
                  "] has shape ", p.sizes());
      TORCH_CHECK(bregman::has_flat_order_of(g, p), "grads[", i, "] must have the strides of params[", i, "] ",
                  p.strides(), " (walked in the same element order) or both be contiguous, got strides ",
                  g.strides());
      if (bregman::is_row_reg(reg) && p.numel() > 0) {
        const int64_t row = group_sizes[i];
        TORCH_CHECK(row >= 1 && p.numel() % row == 0, "group_sizes[", i, "] = ", row,
                    " must be >= 1 and divide params[", i, "].numel() (", p.numel(), ")");
        TORCH_CHECK(bregman::groups_are_blocks(p, row), "params[", i, "] with strides ", p.strides(),
                    " does not hold its groups of ", row, " elements as consecutive memory (the row maps need that)");
      }
    }
    check_state_list("duals", duals, params);
    check_state_list("exp_avgs", exp_avgs, params);
    check_state_list("exp_avg_sqs", exp_avg_sqs, params);

    device_steps = require_device_steps || steps[0].device().is_cuda();
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& st = steps[i];
      TORCH_CHECK(st.defined(), "steps[", i, "] is undefined");
      TORCH_CHECK(st.numel() == 1, "steps[", i, "] must hold exactly one element, got ", st.numel());
      TORCH_CHECK(st.scalar_type() == at::kFloat, "steps[", i, "] must be float32, got ", st.scalar_type());
      if (device_steps) {
        TORCH_CHECK(st.device() == device, "steps[", i, "] must be on the params' device (", device, ")",
                    require_device_steps ? " for fused_step_capturable" : " like steps[0]", ", got ", st.device());
      } else {
        TORCH_CHECK(st.device().is_cpu(), "steps[", i, "] must be on the CPU like steps[0], got ", st.device());
      }
    }
    if (grad_scale.has_value()) check_scalar_tensor("grad_scale", *grad_scale, device, {at::kFloat});
    if (found_inf.has_value()) check_scalar_tensor("found_inf", *found_inf, device, {at::kFloat});
  }
  return {kind, reg, kind == Kind::LinBreg && !exp_avgs.empty(), device_steps};
}

StepInputs make_inputs(const Checked& c, at::TensorList params, at::TensorList grads, at::TensorList duals,
                       at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::IntArrayRef group_sizes,
                       double lr, double beta1, double beta2, double eps, double delta, double lamda_l1,
                       double lamda_group, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  StepInputs in;
  in.kind = c.kind;
  in.reg = c.reg;
  in.momentum = c.momentum;
  in.params = params;
  in.grads = grads;
  in.duals = duals;
  in.exp_avgs = exp_avgs;
  in.exp_avg_sqs = exp_avg_sqs;
  in.group_sizes = group_sizes;
  in.lr = lr;
  in.beta1 = beta1;
  in.beta2 = beta2;
  in.eps = eps;
  in.delta = delta;
  in.lamda_l1 = lamda_l1;
  in.lamda_group = lamda_group;
  in.grad_scale = grad_scale.has_value() ? &*grad_scale : nullptr;
  in.found_inf = found_inf.has_value() ? &*found_inf : nullptr;
  return in;
}

void run_kernels(const StepInputs& in) {
  if (bregman::is_row_reg(in.reg)) {
    launch_row_group(in);
  } else {
    launch_elementwise(in);
  }
}

at::Tensor fused_step_cuda(int64_t kind, at::TensorList params, at::TensorList grads, at::TensorList duals,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                           at::IntArrayRef group_sizes, double lr, double beta1, double beta2, double eps,
                           double delta, int64_t reg, double lamda_l1, double lamda_group,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const Checked c = check_args(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, group_sizes, reg, grad_scale,
                               found_inf, /*require_device_steps=*/false);
  if (params.empty()) {
    const at::Device where = found_inf.has_value() ? found_inf->device()
                             : grad_scale.has_value() ? grad_scale->device()
                                                      : at::Device(at::kCPU);
    return at::zeros({0}, at::TensorOptions().dtype(at::kLong).device(where));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  StepInputs in = make_inputs(c, params, grads, duals, exp_avgs, exp_avg_sqs, group_sizes, lr, beta1, beta2, eps,
                              delta, lamda_l1, lamda_group, grad_scale, found_inf);
  in.counts = at::zeros({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kLong));

  if (c.device_steps) {  // [note: step counts]
    launch_increment_steps(steps, in.found_inf);
    in.device_steps = steps;
  } else {
    // one device→host read when found_inf is given with CPU steps, see [note: step counts]
    const bool skip = found_inf.has_value() && found_inf->item<float>() != 0.0f;
    in.host_steps.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      float* st = steps[i].data_ptr<float>();
      if (!skip) *st += 1.0f;
      in.host_steps[i] = static_cast<double>(*st);
    }
  }
  run_kernels(in);
  return in.counts;
}

void fused_step_capturable_cuda(int64_t kind, at::TensorList params, at::TensorList grads, at::TensorList duals,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                                at::IntArrayRef group_sizes, const at::Tensor& lr, double beta1, double beta2,
                                double eps, double delta, int64_t reg, double lamda_l1, double lamda_group,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf, const at::Tensor& counts) {
  const Checked c = check_args(kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, group_sizes, reg, grad_scale,
                               found_inf, /*require_device_steps=*/true);
  TORCH_CHECK(counts.defined() && counts.scalar_type() == at::kLong, "counts must be an int64 tensor, got ",
              counts.defined() ? c10::toString(counts.scalar_type()) : "undefined");
  TORCH_CHECK(counts.numel() == static_cast<int64_t>(params.size()), "counts must have one element per param (",
              params.size(), "), got ", counts.numel());
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(counts.device() == device, "counts must be on the params' device (", device, "), got ",
              counts.device());
  TORCH_CHECK(counts.is_contiguous(), "counts must be contiguous");
  check_scalar_tensor("lr", lr, device, {at::kFloat, at::kDouble});

  const c10::cuda::CUDAGuard guard(device);
  StepInputs in = make_inputs(c, params, grads, duals, exp_avgs, exp_avg_sqs, group_sizes, /*lr=*/0.0, beta1, beta2,
                              eps, delta, lamda_l1, lamda_group, grad_scale, found_inf);
  in.lr_tensor = &lr;
  in.counts = counts;
  counts.zero_();  // a fill kernel: capturable, no allocation
  launch_increment_steps(steps, in.found_inf);
  in.device_steps = steps;
  run_kernels(in);
}

}  // namespace
}  // namespace bregman_cuda

TORCH_LIBRARY_FRAGMENT(bregman_fused, m) {
  m.def(
      "fused_step_capturable(int kind, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] duals, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, int[] group_sizes, Tensor lr, "
      "float beta1, float beta2, float eps, float delta, int reg, float lamda_l1, float lamda_group, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor(f!) counts) -> ()");
}

TORCH_LIBRARY_IMPL(bregman_fused, CUDA, m) {
  m.impl("fused_step", &bregman_cuda::fused_step_cuda);
  m.impl("fused_step_capturable", &bregman_cuda::fused_step_capturable_cuda);
}

// `import bregman_fused._C_cuda` only has to run the registrations above; the module itself is empty.
#ifdef TORCH_EXTENSION_NAME
#define BF_CONCAT_(a, b) a##b
#define BF_CONCAT(a, b) BF_CONCAT_(a, b)
#define BF_STR_(x) #x
#define BF_STR(x) BF_STR_(x)
extern "C" PyMODINIT_FUNC BF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, BF_STR(TORCH_EXTENSION_NAME),
      "CUDA kernels of bregman_fused (registers torch.ops.bregman_fused.fused_step for CUDA tensors and "
      "fused_step_capturable)",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return bregman::create_module(&module_def);
}
#endif
