// What the op hands to the CPU kernel: one TensorWork per tensor of the bucket. Kept free of
// at::vec so that fused_step.cpp (checks, bookkeeping) compiles without the SIMD headers.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "bregman_math.h"

namespace bregman::cpu {

// Compute type: float for float/bfloat16/half parameters, double for double.
template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One tensor of the bucket, as the kernel sees it. Pointers to states a kind does not use are null.
template <typename T>
struct TensorWork {
  void* theta = nullptr;        // param data, in the param dtype
  const void* grad = nullptr;   // grad data, in the grad dtype of the kernel variant (run_fused_step)
  T* v = nullptr;               // dual
  T* m = nullptr;               // momentum buffer / exp_avg
  T* s = nullptr;               // exp_avg_sq
  int64_t numel = 0;
  int64_t n = 1;                // row length (row regularizers), 1 otherwise
  StepParams<T> hp{};           // this tensor's constants (its step count, its row threshold)
};

// A tensor's compact moments (StepHyper::moments bf16 or 8bit; csrc/moment_codes.h), as stored: in
// Work::moments, beside its TensorWork rather than in it, so that TensorWork keeps its layout and
// the fp32 kernels compile to the same instructions.
struct MomentWork {
  void* m = nullptr;            // bf16 bits or int8 codes of exp_avg / the momentum buffer
  void* s = nullptr;            // bf16 bits or uint8 codes of exp_avg_sq
  float* m_scale = nullptr;     // 8-bit: block scales, (rows, blocks per row) row-major
  float* s_scale = nullptr;
  int64_t row_len = 0;          // 8-bit: elements per dim-0 row (the blocks follow rows)
  uint32_t step = 0;            // bf16: the step count that seeds the random bits
};

template <typename T>
struct Work {
  StepHyper hyper;              // the call's codes (kind, reg, momentum) and scalars
  bool stream = false;          // non-temporal stores for θ [note: streaming stores]
  bool has_scale = false;       // divide grads by `scale` (AMP)
  T scale = T(1);
  std::vector<TensorWork<T>> tensors;
  std::vector<int64_t> op_index;  // op_index[k]: tensor k's position in the op's lists (its count)
  std::vector<MomentWork> moments;  // moments[k]: tensor k's compact moments (empty for fp32 moments)
};

// Runs the step on every tensor of `w`, whose grads are all of grad_t: the param dtype, or the
// compute type (float grads of bf16/fp16 params, csrc/grad_dtypes.h [note: grad dtypes]).
// counts[w.op_index[k]] += non-zeros of the new θ of tensor k.
template <typename scalar_t, typename grad_t>
void run_fused_step(const Work<opmath_t<scalar_t>>& w, int64_t* counts);

}  // namespace bregman::cpu
