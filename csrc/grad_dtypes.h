// The dtypes of the fused ops' tensors, shared by the CPU op (csrc/cpu/fused_step.cpp) and the CUDA
// ops (csrc/cuda/ops_cuda.cpp): the params' dtypes, the state dtype, and which grad dtypes the
// kernels read.
//
// [note: grad dtypes] A grad may have any of the param dtypes, whatever its param's: the reference
// reads it as grads[i].to(state dtype) (bregman_fused/backends/reference.py), and mixed-precision
// training keeps float32 grads of bf16/fp16 params (torch's Tensor.grad_dtype). The kernels read a
// grad in its param's dtype or in the state dtype as it is stored and convert it in registers: for
// the state dtype that is no conversion at all, for a bf16/fp16 grad the exact widening to float,
// so both equal the reference's .to(). A grad of any other dtype (a float64 grad of a float32
// param, a bf16 grad of a fp16 param: rare) is converted to the state dtype by the op first, one
// copy with the reference's rounding, instead of a compiled kernel variant per dtype pair.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <vector>

#include "step_tensors.h"

namespace bregman {

// The dtypes the kernels take for params (and grads).
inline bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Optimizer states (and the compute type): float64 for float64 params, float32 otherwise.
inline at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Grads the kernels read as they are (the others are converted first, [note: grad dtypes]).
inline bool kernels_read_grad(at::ScalarType param_dtype, at::ScalarType grad_dtype) {
  return grad_dtype == param_dtype || grad_dtype == state_dtype(param_dtype);
}

// `t` with every grad in a dtype the kernels read: t itself when they all are (the usual case, no
// allocation), else with the others converted to the state dtype, held in `storage` (which must
// outlive the returned lists). Converted grads keep their strides (Tensor.to preserves a dense
// layout), so the layout checks made on the originals still hold. Call after the checks.
inline StepTensors with_kernel_grads(const StepTensors& t, std::vector<at::Tensor>& storage) {
  if (t.size() == 0) return t;
  const at::ScalarType param_dtype = t.params[0].scalar_type();
  size_t i = 0;
  while (i < t.size() && kernels_read_grad(param_dtype, t.grads[i].scalar_type())) ++i;
  if (i == t.size()) return t;
  storage.assign(t.grads.begin(), t.grads.end());
  for (; i < t.size(); ++i) {
    if (!kernels_read_grad(param_dtype, storage[i].scalar_type())) storage[i] = storage[i].to(state_dtype(param_dtype));
  }
  StepTensors out = t;
  out.grads = storage;
  return out;
}

}  // namespace bregman
