// The one place that turns a call's run-time codes into a compiled kernel variant: the param dtype
// (float32, float64, float16, bfloat16), the grad dtype of the launch series (the param dtype, or
// float32 for float16/bfloat16 params: csrc/grad_dtypes.h [note: grad dtypes]), the optimizer kind,
// and LinBreg's momentum; for compact moments also their format (dispatch_compact_step). Used by the
// kernel families (elementwise.cu, row_group.cu, moments_8bit.cu); which family runs is decided by
// the regularizer and the moment format (ops_cuda.cpp run_kernels), and the regularizer itself stays a
// run-time switch inside the kernels (uniform per launch: it costs nothing next to the memory
// traffic and keeps the number of kernel instantiations, and the compile time, down).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

#include "bregman_math.h"
#include "fused_step_cuda.h"
#include "moment_codes.h"

namespace bregman_cuda {

// A compiled variant, handed to the caller's generic lambda as a value of this type.
template <typename ScalarT, typename GradT, bregman::Kind K, bool Momentum,
          bregman::Moments Mom = bregman::Moments::Fp32>
struct StepVariant {
  using scalar_t = ScalarT;                        // the params' dtype
  using grad_t = GradT;                            // the grads' dtype: scalar_t or opmath_t
  using opmath_t = at::opmath_type<ScalarT>;       // compute and state dtype
  static_assert(std::is_same_v<GradT, ScalarT> || std::is_same_v<GradT, opmath_t>);
  static constexpr bregman::Kind kind = K;
  static constexpr bool momentum = Momentum;       // LinBreg with momentum buffers
  static constexpr bregman::Moments moments = Mom; // how exp_avgs / exp_avg_sqs are stored
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

// ---- compact moments (compact_moments.cuh) ---------------------------------------------------------
// Only the kinds with moments (AdaBreg, LinBreg with momentum) and the float32-state params (float32,
// float16, bfloat16) store compact moments: the op checks refuse float64 params, and ProxSGD and
// LinBreg without momentum have no exp_avgs, so their moments are always Fp32. Nothing else is
// compiled (the float64 kernels would be dead code).
template <bregman::Moments Mom, typename ScalarT, typename GradT, typename Fn>
void dispatch_compact_kind(const StepInputs& in, Fn&& fn) {
  using bregman::Kind;
  if (in.hyper.kind == Kind::AdaBreg) {
    fn(StepVariant<ScalarT, GradT, Kind::AdaBreg, false, Mom>{});
  } else if (in.hyper.kind == Kind::LinBreg && in.hyper.momentum) {
    fn(StepVariant<ScalarT, GradT, Kind::LinBreg, true, Mom>{});
  } else {
    TORCH_CHECK(false, "bregman_fused: ", bregman::moments_name(Mom), " moments with ",
                bregman::kind_name(in.hyper.kind), " without moments");
  }
}

template <bregman::Moments Mom, typename ScalarT, typename Fn>
void dispatch_compact_grad(const StepInputs& in, Fn&& fn) {
  if constexpr (!std::is_same_v<ScalarT, float>) {
    if (in.grad_dtype != in.tensors.params[0].scalar_type()) return dispatch_compact_kind<Mom, ScalarT, float>(in, fn);
  }
  dispatch_compact_kind<Mom, ScalarT, ScalarT>(in, fn);
}

// fn(StepVariant<scalar_t, grad_t, kind, momentum, Mom>{}) for a call whose moments are stored as Mom.
template <bregman::Moments Mom, typename Fn>
void dispatch_compact_step(const StepInputs& in, Fn&& fn) {
  static_assert(Mom != bregman::Moments::Fp32, "fp32 moments: dispatch_step");
  const at::ScalarType dtype = in.tensors.params[0].scalar_type();
  switch (dtype) {
    case at::kFloat: return dispatch_compact_grad<Mom, float>(in, fn);
    case at::kHalf: return dispatch_compact_grad<Mom, at::Half>(in, fn);
    case at::kBFloat16: return dispatch_compact_grad<Mom, at::BFloat16>(in, fn);
    default:
      TORCH_CHECK(false, "bregman_fused: ", bregman::moments_name(Mom), " moments with ", dtype, " params");
  }
}

}  // namespace bregman_cuda
