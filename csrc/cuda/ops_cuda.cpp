// CUDA bindings of the bregman_fused ops: argument checks (csrc/op_checks.h, shared with the CPU op,
// plus the CUDA-only arguments), where the step counts are read and the choice of kernel. No math here (that is
// bregman_math.h) and no kernels (elementwise.cu, row_group.cu, moments_8bit.cu).
//
// Registers
//  - the CUDA kernel of `fused_step` (schema defined with TORCH_LIBRARY in csrc/ops.cpp), and
//  - the op `fused_step_capturable` (schema in the TORCH_LIBRARY_FRAGMENT below, CUDA only).
//
// [note: step counts] `fused_step` accepts its 0-dim float32 step counters in either place:
//  - on the CPU (the optimizer's default): the op adds one to each here, after its checks (a
//    Python add costs µs per 0-dim tensor, bregman_fused/backends/contract.py [note: who adds]),
//    and the bias corrections are computed on the host in double with bregman::make_step_params.
//    found_inf reaches the op only in capturable steps (the caller reads it once otherwise and does
//    not call the op for a skipped step); a direct call with found_inf and CPU counters makes ONE
//    device→host read of it to know whether to count.
//  - on the params' device (what torch's _fused_adam does): the caller has advanced them by
//    found_inf == 0 with device ops (contract.begin_step), and the update kernels read the count
//    and compute the bias corrections in-kernel (in double). No host read; use this with AMP.
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
#include "fused_step_cuda.h"
#include "grad_dtypes.h"
#include "module_init.h"
#include "op_checks.h"
#include "step_tensors.h"

namespace bregman_cuda {
namespace {

using bregman::check_scalar_tensor;
using bregman::Kind;
using bregman::OpBoundary;
using bregman::StepHyper;
using bregman::StepTensors;

constexpr OpBoundary kStepOp{"bregman_fused.fused_step", c10::DeviceType::CUDA};
constexpr OpBoundary kCapturableOp{"bregman_fused.fused_step_capturable", c10::DeviceType::CUDA};

// The checks shared with the CPU op, then where the step counts live (the caller's choice, decided
// by steps[0], or the device for the capturable op) and the AMP scalars the kernels read as float32.
// Returns whether the step counts are on the device.
bool check_args(const OpBoundary& op, const StepHyper& hyper, const StepTensors& t,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                bool require_device_steps) {
  const size_t n = t.size();
  TORCH_CHECK(n <= static_cast<size_t>(INT32_MAX), op.op, ": too many params: ", n);  // table indices are int32
  bregman::check_step_tensors(op, hyper, t);  // compact moments too (check_compact_moments)
  if (n == 0) return require_device_steps;
  const at::Device device = t.params[0].device();
  const bool device_steps = require_device_steps || t.steps[0].device().is_cuda();
  const at::Device steps_device = device_steps ? device : at::Device(at::kCPU);
  const char* where = require_device_steps ? "fused_step_capturable keeps the step counts on the params' device"
                                           : "all step counts where steps[0] is";
  for (size_t i = 0; i < n; ++i) bregman::check_step_count(op, i, t.steps[i], steps_device, where);
  check_scalar_tensor(op, "grad_scale", grad_scale, device, bregman::is_float32, "float32");
  check_scalar_tensor(op, "found_inf", found_inf, device, bregman::is_float32, "float32");
  return device_steps;
}

StepInputs make_inputs(const StepHyper& hyper, const StepTensors& t, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  StepInputs in;
  in.hyper = hyper;
  in.tensors = t;
  in.grad_scale = grad_scale.has_value() ? &*grad_scale : nullptr;
  in.found_inf = found_inf.has_value() ? &*found_inf : nullptr;
  return in;
}

// One launch series per grad dtype of the call (StepInputs::grad_dtype): the param dtype, and
// float32 for float16/bfloat16 params (grads of other dtypes were converted, csrc/grad_dtypes.h).
// The kernels of a series: fp32 and bf16 moments (compact_moments.cuh) are updated by the
// element-wise or the row kernel with θ; 8-bit moments by moments_8bit.cu, which writes θ itself for
// the element-wise maps, and for the row maps is followed by the row kernel's θ pass.
void run_kernels(StepInputs& in) {
  const at::ScalarType param_dtype = in.tensors.params[0].scalar_type();
  bool param_dtype_grads = false;
  bool float_grads = false;  // of float16/bfloat16 params
  for (const at::Tensor& g : in.tensors.grads) {
    (g.scalar_type() == param_dtype ? param_dtype_grads : float_grads) = true;
  }
  in.mixed_grads = param_dtype_grads && float_grads;
  auto launch_series = [&](at::ScalarType grad_dtype) {
    in.grad_dtype = grad_dtype;
    const bool row_reg = bregman::is_row_reg(in.hyper.reg);
    if (in.hyper.moments == bregman::Moments::Int8) {
      launch_moments_8bit(in);
      if (row_reg) launch_row_group(in);  // θ from the duals just written (same stream)
    } else if (row_reg) {
      launch_row_group(in);
    } else {
      launch_elementwise(in);
    }
  };
  if (param_dtype_grads) launch_series(param_dtype);
  if (float_grads) launch_series(at::kFloat);
}

at::Tensor fused_step_cuda(int64_t kind, at::TensorList params, at::TensorList grads, at::TensorList duals,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                           at::TensorList exp_avg_sq_scales, at::TensorList steps,
                           at::IntArrayRef group_sizes, double lr, double beta1, double beta2, double eps,
                           double delta, int64_t reg, double lamda_l1, double lamda_group,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const StepTensors t{params, grads, duals, exp_avgs, exp_avg_sqs, steps, group_sizes, exp_avg_scales,
                      exp_avg_sq_scales};
  const StepHyper hyper =
      bregman::make_step_hyper(kStepOp, kind, reg, t, lr, beta1, beta2, eps, delta, lamda_l1, lamda_group);
  const bool device_steps = check_args(kStepOp, hyper, t, grad_scale, found_inf, /*require_device_steps=*/false);
  if (params.empty()) {
    const at::Device where = found_inf.has_value() ? found_inf->device()
                             : grad_scale.has_value() ? grad_scale->device()
                                                      : at::Device(at::kCPU);
    return at::zeros({0}, at::TensorOptions().dtype(at::kLong).device(where));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<at::Tensor> converted_grads;
  StepInputs in = make_inputs(hyper, bregman::with_kernel_grads(t, converted_grads), grad_scale, found_inf);
  in.counts = at::zeros({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kLong));

  if (device_steps) {  // [note: step counts]
    in.device_steps = true;
  } else {
    const bool skip = found_inf.has_value() && found_inf->item<float>() != 0.0f;
    in.host_steps.resize(params.size());
    // all adds, then the reads (as the CPU op: a counter shared by several params reads one count)
    if (!skip) {
      for (size_t i = 0; i < params.size(); ++i) *steps[i].data_ptr<float>() += 1.0f;
    }
    for (size_t i = 0; i < params.size(); ++i) in.host_steps[i] = static_cast<double>(*steps[i].data_ptr<float>());
  }
  run_kernels(in);
  return in.counts;
}

// fused_step.tensor_lr on CUDA: the lr is read on the host (a sync when it lives on the GPU; for a
// step without any host read use the capturable op, bregman_fused/backends/native.py)
at::Tensor fused_step_tensor_lr_cuda(int64_t kind, at::TensorList params, at::TensorList grads,
                                     at::TensorList duals, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                     at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                                     at::TensorList steps, at::IntArrayRef group_sizes, const at::Tensor& lr,
                                     double beta1, double beta2, double eps, double delta, int64_t reg,
                                     double lamda_l1, double lamda_group, const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(lr.defined() && lr.numel() == 1 && lr.is_floating_point(), kStepOp.op,
              ": lr must be a one-element floating-point tensor");
  return fused_step_cuda(kind, params, grads, duals, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps,
                         group_sizes, lr.item<double>(),
                         beta1, beta2, eps, delta, reg, lamda_l1, lamda_group, grad_scale, found_inf);
}

void fused_step_capturable_cuda(int64_t kind, at::TensorList params, at::TensorList grads, at::TensorList duals,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList exp_avg_scales,
                                at::TensorList exp_avg_sq_scales, at::TensorList steps,
                                at::IntArrayRef group_sizes, const at::Tensor& lr, double beta1, double beta2,
                                double eps, double delta, int64_t reg, double lamda_l1, double lamda_group,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf, const at::Tensor& counts) {
  const StepTensors t{params, grads, duals, exp_avgs, exp_avg_sqs, steps, group_sizes, exp_avg_scales,
                      exp_avg_sq_scales};
  // lr is read from the device tensor in-kernel (LaunchArgs::lr_ptr): hyper.lr stays unused
  const StepHyper hyper = bregman::make_step_hyper(kCapturableOp, kind, reg, t, /*lr=*/0.0, beta1, beta2, eps, delta,
                                                   lamda_l1, lamda_group);
  check_args(kCapturableOp, hyper, t, grad_scale, found_inf, /*require_device_steps=*/true);
  const char* op = kCapturableOp.op;
  TORCH_CHECK(counts.defined() && counts.scalar_type() == at::kLong, op, ": counts must be an int64 tensor, got ",
              counts.defined() ? c10::toString(counts.scalar_type()) : "undefined");
  TORCH_CHECK(counts.numel() == static_cast<int64_t>(params.size()), op, ": counts must have one element per param (",
              params.size(), "), got ", counts.numel());
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(counts.device() == device, op, ": counts must be on the params' device (", device, "), got ",
              counts.device());
  TORCH_CHECK(counts.is_contiguous(), op, ": counts must be contiguous");
  check_scalar_tensor(kCapturableOp, "lr", lr, device, bregman::is_float32_or_64, "float32 or float64");

  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> converted_grads;  // a conversion kernel and a graph-pool allocation: capturable
  StepInputs in = make_inputs(hyper, bregman::with_kernel_grads(t, converted_grads), grad_scale, found_inf);
  in.lr_tensor = &lr;
  in.counts = counts;
  counts.zero_();  // a fill kernel: capturable, no allocation
  in.device_steps = true;  // [note: step counts]
  run_kernels(in);
}

}  // namespace
}  // namespace bregman_cuda

TORCH_LIBRARY_FRAGMENT(bregman_fused, m) {
  m.def(
      "fused_step_capturable(int kind, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] duals, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(f!)[] exp_avg_scales, "
      "Tensor(g!)[] exp_avg_sq_scales, Tensor[] steps, int[] group_sizes, Tensor lr, "
      "float beta1, float beta2, float eps, float delta, int reg, float lamda_l1, float lamda_group, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor(e!) counts) -> ()");
}

TORCH_LIBRARY_IMPL(bregman_fused, CUDA, m) {
  m.impl("fused_step", &bregman_cuda::fused_step_cuda);
  m.impl("fused_step.tensor_lr", &bregman_cuda::fused_step_tensor_lr_cuda);
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
