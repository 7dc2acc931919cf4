// Op schemas and bindings of bregman_fused: no math here (csrc/bregman_math.h), no kernels
// (csrc/cpu/, csrc/cuda/). The CUDA extension registers its kernel for the same schema with
// TORCH_LIBRARY_IMPL(bregman_fused, CUDA, m).
#include <Python.h>
#include <torch/library.h>

#include "cpu/fused_step.h"
#include "module_init.h"

// One call updates every tensor of a (param group, device, dtype) bucket; see docs/design.md §2 and
// bregman_fused/reference.py (the spec). kind and reg: the codes of bregman::Kind and bregman::Reg
// (csrc/bregman_math.h). Returns the non-zeros of each new θ (int64). The Python side
// (bregman_fused/_ext.py) calls it positionally: the schema is its interface.
TORCH_LIBRARY(bregman_fused, m) {
  m.def(
      "fused_step(int kind, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] duals, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, int[] group_sizes, float lr, float beta1, float beta2, "
      "float eps, float delta, int reg, float lamda_l1, float lamda_group, Tensor? grad_scale, "
      "Tensor? found_inf) -> Tensor");
}

TORCH_LIBRARY_IMPL(bregman_fused, CPU, m) { m.impl("fused_step", &bregman::cpu::fused_step); }

// `import bregman_fused._C` (or the JIT-built module) registers the ops above as a side effect;
// the module itself is empty. Plain CPython API instead of pybind11: nothing to bind, faster build.
#define BF_CONCAT_(a, b) a##b
#define BF_CONCAT(a, b) BF_CONCAT_(a, b)
#define BF_STRINGIFY_(a) #a
#define BF_STRINGIFY(a) BF_STRINGIFY_(a)

static PyModuleDef bf_module = {PyModuleDef_HEAD_INIT, BF_STRINGIFY(TORCH_EXTENSION_NAME),
                                "bregman_fused C++ ops (registered in torch.ops.bregman_fused)", -1,
                                nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC BF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return bregman::create_module(&bf_module); }
