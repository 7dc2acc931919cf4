// Op schemas and bindings of bregman_fused: no math here (csrc/bregman_math.h), no kernels
// (csrc/cpu/, csrc/cuda/). The CUDA extension registers its kernel for the same schema with
// TORCH_LIBRARY_IMPL(bregman_fused, CUDA, m).
#include <Python.h>
#include <torch/library.h>

#include "cpu/fused_step.h"
#include "module_init.h"

// One call updates every tensor of a (param group, device, dtype) bucket; see docs/design.md §2, §5
// and bregman_fused/backends/reference.py (the spec). kind and reg: the codes of bregman::Kind and
// bregman::Reg (csrc/bregman_math.h). Moments are stored as exp_avgs' dtype says (the state dtype,
// bfloat16, or int8/uint8 codes with float32 block scales in exp_avg_scales / exp_avg_sq_scales,
// bregman_fused/backends/moments.py); the scale lists are empty for the other formats. Step counters on the CPU are incremented by the op (not when
// found_inf is set); counters on a device were advanced by the caller (ops_cuda.cpp [note: step
// counts]). Returns the non-zeros of each new θ (int64). The Python side (bregman_fused/backends/
// native.py) calls it positionally: the schema is its interface; its fake kernel, for
// torch.compile, is in bregman_fused/backends/fake_kernels.py.
TORCH_LIBRARY(bregman_fused, m) {
  m.def(
      "fused_step(int kind, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] duals, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(f!)[] exp_avg_scales, Tensor(g!)[] exp_avg_sq_scales, "
      "Tensor(e!)[] steps, int[] group_sizes, float lr, float beta1, float beta2, "
      "float eps, float delta, int reg, float lamda_l1, float lamda_group, Tensor? grad_scale, "
      "Tensor? found_inf) -> Tensor");
  // the same step with lr as a one-element tensor (an lr scheduler's tensor lr): under torch.compile
  // its value is data, not a constant of the graph, so a new lr does not recompile
  m.def(
      "fused_step.tensor_lr(int kind, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] duals, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(f!)[] exp_avg_scales, "
      "Tensor(g!)[] exp_avg_sq_scales, Tensor(e!)[] steps, int[] group_sizes, Tensor lr, "
      "float beta1, float beta2, float eps, float delta, int reg, float lamda_l1, float lamda_group, "
      "Tensor? grad_scale, Tensor? found_inf) -> Tensor");
}

namespace {

at::Tensor fused_step_tensor_lr_cpu(int64_t kind, at::TensorList params, at::TensorList grads, at::TensorList duals,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                    at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                                    at::TensorList steps, at::IntArrayRef group_sizes, const at::Tensor& lr, double beta1, double beta2,
                                    double eps, double delta, int64_t reg, double lamda_l1, double lamda_group,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(lr.defined() && lr.numel() == 1 && lr.is_floating_point() && lr.device().is_cpu(),
              "bregman_fused.fused_step: lr must be a one-element floating-point CPU tensor for CPU params");
  return bregman::cpu::fused_step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, exp_avg_scales,
                                  exp_avg_sq_scales, steps, group_sizes,
                                  lr.item<double>(), beta1, beta2, eps, delta, reg, lamda_l1, lamda_group,
                                  grad_scale, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(bregman_fused, CPU, m) {
  m.impl("fused_step", &bregman::cpu::fused_step);
  m.impl("fused_step.tensor_lr", &fused_step_tensor_lr_cpu);
}

// `import bregman_fused._C` (or the JIT-built module) registers the ops above as a side effect;
// the module itself is empty. Plain CPython API instead of pybind11: nothing to bind, faster build.
#define BF_CONCAT_(a, b) a##b
#define BF_CONCAT(a, b) BF_CONCAT_(a, b)
#define BF_STRINGIFY_(a) #a
#define BF_STRINGIFY(a) BF_STRINGIFY_(a)

static PyModuleDef bf_module = {PyModuleDef_HEAD_INIT, BF_STRINGIFY(TORCH_EXTENSION_NAME),
                                "bregman_fused C++ ops (registered in torch.ops.bregman_fused)", -1,
                                nullptr, nullptr, nullptr, nullptr, nullptr};

// `cpu_isa`: the at::vec capability the CPU kernels were compiled for (every translation unit gets
// the same flags, bregman_fused/_build.py [note: cpu arch flags]), so a test or a user can see which
// build is loaded.
#if defined(CPU_CAPABILITY_AVX512)
#define BF_CPU_ISA "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#define BF_CPU_ISA "avx2"
#else
#define BF_CPU_ISA "default"
#endif

PyMODINIT_FUNC BF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = bregman::create_module(&bf_module);
  if (module != nullptr && PyModule_AddStringConstant(module, "cpu_isa", BF_CPU_ISA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
