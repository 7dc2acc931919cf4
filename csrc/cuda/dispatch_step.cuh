// The one place that turns a call's run-time codes into a compiled kernel variant: the param dtype
// (float32, float64, float16, bfloat16), the grad dtype of the launch series (the param dtype, or
// float32 for float16/bfloat16 params: csrc/grad_dtypes.h [note: grad dtypes]), the optimizer kind,
// and LinBreg's momentum. Used by both kernel families (elementwise.cu, row_group.cu); which family
// runs is decided by the regularizer (ops_cuda.cpp run_kernels), and the regularizer itself stays a
// run-time switch inside the kernels (uniform per launch: it costs nothing next to the memory
// traffic and keeps the number of kernel instantiations, and the compile time, down).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

#include "bregman_math.h"
#include "fused_step_cuda.h"

namespace bregman_cuda {

// A compiled variant, handed to the caller's generic lambda as a value of this type.
template <typename ScalarT, typename GradT, bregman::Kind K, bool Momentum>
struct StepVariant {
  using scalar_t = ScalarT;                        // the params' dtype
  using grad_t = GradT;                            // the grads' dtype: scalar_t or opmath_t
  using opmath_t = at::opmath_type<ScalarT>;       // compute and state dtype
  static_assert(std::is_same_v<GradT, ScalarT> || std::is_same_v<GradT, opmath_t>);
  static constexpr bregman::Kind kind = K;
  static constexpr bool momentum = Momentum;       // LinBreg with momentum buffers
};

template <typename ScalarT, typename GradT, typename Fn>
void dispatch_kind(const StepInputs& in, Fn&& fn) {
  using bregman::Kind;
  switch (in.hyper.kind) {
    case Kind::LinBreg:
      if (in.hyper.momentum) {
        fn(StepVariant<ScalarT, GradT, Kind::LinBreg, true>{});
      } else {
        fn(StepVariant<ScalarT, GradT, Kind::LinBreg, false>{});
      }
      break;
    case Kind::AdaBreg:
      fn(StepVariant<ScalarT, GradT, Kind::AdaBreg, false>{});
      break;
    case Kind::ProxSGD:
      fn(StepVariant<ScalarT, GradT, Kind::ProxSGD, false>{});
      break;
  }
}

// fn(StepVariant<scalar_t, grad_t, kind, momentum>{}) for the call's param dtype, the launch
// series' grad dtype (in.grad_dtype), the kind and momentum.
template <typename Fn>
void dispatch_step(const StepInputs& in, Fn&& fn) {
  const at::ScalarType dtype = in.tensors.params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bregman_fused_step", [&] {
    using opmath = at::opmath_type<scalar_t>;
    if constexpr (!std::is_same_v<scalar_t, opmath>) {
      if (in.grad_dtype != dtype) return dispatch_kind<scalar_t, opmath>(in, fn);
    }
    dispatch_kind<scalar_t, scalar_t>(in, fn);
  });
}

}  // namespace bregman_cuda
