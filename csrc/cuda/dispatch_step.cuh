// The one place that turns a call's run-time codes into a compiled kernel variant: the param dtype
// (float32, float64, float16, bfloat16), the optimizer kind, and LinBreg's momentum. Used by both
// kernel families (elementwise.cu, row_group.cu); which family runs is decided by the regularizer
// (ops_cuda.cpp run_kernels), and the regularizer itself stays a run-time switch inside the kernels
// (uniform per launch: it costs nothing next to the memory traffic and keeps the number of kernel
// instantiations, and the compile time, down).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "bregman_math.h"
#include "fused_step_cuda.h"

namespace bregman_cuda {

// A compiled variant, handed to the caller's generic lambda as a value of this type.
template <typename ScalarT, bregman::Kind K, bool Momentum>
struct StepVariant {
  using scalar_t = ScalarT;                        // the params' (and grads') dtype
  using opmath_t = at::opmath_type<ScalarT>;       // compute and state dtype
  static constexpr bregman::Kind kind = K;
  static constexpr bool momentum = Momentum;       // LinBreg with momentum buffers
};

// fn(StepVariant<scalar_t, kind, momentum>{}) for the call's param dtype, kind and momentum.
template <typename Fn>
void dispatch_step(const StepInputs& in, Fn&& fn) {
  using bregman::Kind;
  const at::ScalarType dtype = in.tensors.params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bregman_fused_step", [&] {
    switch (in.hyper.kind) {
      case Kind::LinBreg:
        if (in.hyper.momentum) {
          fn(StepVariant<scalar_t, Kind::LinBreg, true>{});
        } else {
          fn(StepVariant<scalar_t, Kind::LinBreg, false>{});
        }
        break;
      case Kind::AdaBreg:
        fn(StepVariant<scalar_t, Kind::AdaBreg, false>{});
        break;
      case Kind::ProxSGD:
        fn(StepVariant<scalar_t, Kind::ProxSGD, false>{});
        break;
    }
  });
}

}  // namespace bregman_cuda
