// Per-element math of every bregman_fused kernel: the dual updates and the proximal maps.
//
// Written once, used by the CPU kernels (scalar tail and at::vec::Vectorized<float> body) and the
// CUDA kernels. The spec is bregman_fused/backends/reference.py; the formulas below follow its op order so
// that fused and reference results differ only by rounding.
//
// Every function is a template on the compute type T (float, double, or a SIMD vector type that
// provides + - * / and the bf_min / bf_max / bf_sqrt overloads below), so one formula serves the
// vector body and the scalar tail. [note: one formula] Memory access (loads, casts from bf16/fp16,
// stores, chunking) stays in the kernels; nothing here touches memory.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BF_HD __host__ __device__ __forceinline__
#else
#define BF_HD inline
#endif

namespace bregman {

// Optimizer and regularizer codes: the ONE C++ definition (the op checks and their messages are
// written from these). The Python side passes them as ints: the enums Kind and RegCode of
// bregman_fused/backends/contract.py, which tests/test_contract.py checks against these.
enum class Kind : int64_t { LinBreg = 0, AdaBreg = 1, ProxSGD = 2 };
enum class Reg : int64_t { None = 0, L1 = 1, L1Pos = 2, Group = 3, SparseGroup = 4 };
// How a call's moments are stored (bregman_fused/backends/moments.py; the math: moment_codes.h):
// in the state dtype, bfloat16, or 8-bit codes with block scales. Read from exp_avgs' dtype.
enum class Moments : int64_t { Fp32 = 0, Bf16 = 1, Int8 = 2 };
constexpr Kind kLastKind = Kind::ProxSGD;    // codes run from 0 to these, without gaps
constexpr Reg kLastReg = Reg::SparseGroup;

// Names for error messages.
constexpr const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::LinBreg: return "LinBreg";
    case Kind::AdaBreg: return "AdaBreg";
    case Kind::ProxSGD: return "ProxSGD";
  }
  return "?";
}
constexpr const char* reg_name(Reg reg) {
  switch (reg) {
    case Reg::None: return "none";
    case Reg::L1: return "L1";
    case Reg::L1Pos: return "L1Pos";
    case Reg::Group: return "Group";
    case Reg::SparseGroup: return "SparseGroup";
  }
  return "?";
}

BF_HD constexpr bool is_row_reg(Reg reg) { return reg == Reg::Group || reg == Reg::SparseGroup; }

// ---- scalar building blocks (SIMD types bring their own overloads) ---------------------------
// min/max propagate a NaN in `a` (the data; `b` is always a threshold or 0) like torch.clamp does,
// and like the SIMD overloads below, so the vector body and the scalar tail agree on NaNs too.
BF_HD float bf_min(float a, float b) { return b < a ? b : a; }
BF_HD float bf_max(float a, float b) { return b > a ? b : a; }
BF_HD float bf_sqrt(float a) { return ::sqrtf(a); }
BF_HD double bf_min(double a, double b) { return b < a ? b : a; }
BF_HD double bf_max(double a, double b) { return b > a ? b : a; }
BF_HD double bf_sqrt(double a) { return ::sqrt(a); }
// a > b ? x : y, written as a select so SIMD types can blend (both x and y are evaluated)
BF_HD float bf_select_gt(float a, float b, float x, float y) { return a > b ? x : y; }
BF_HD double bf_select_gt(double a, double b, double x, double y) { return a > b ? x : y; }

}  // namespace bregman

// The CPU kernels define BREGMAN_MATH_AT_VEC to get the at::vec::Vectorized overloads. They must be
// declared here, before the templates below: the templates call bf_min etc. unqualified, and
// two-phase lookup only finds functions of namespace bregman that are visible at the template's
// definition (ADL at instantiation only searches at::vec). Never seen by nvcc.
#if defined(BREGMAN_MATH_AT_VEC) && !defined(__CUDACC__) && !defined(__HIPCC__)
#include <ATen/cpu/vec/vec.h>
#define BREGMAN_MATH_HAS_AT_VEC 1  // checked by csrc/cpu/simd_memory.h

namespace bregman {
// bf_min / bf_max exactly as the scalar ones above, b < a ? b : a and b > a ? b : a: x86's min and
// max return their second operand when the compare is false (a NaN or equal zeros), so with the
// operands swapped each is one instruction with the scalar tail's bits: a NaN in `a` passes with its
// payload. at::vec::minimum / maximum (the fallback below) write an all-ones NaN instead (three
// instructions): the SIMD body and the tail would store different NaNs, and so would the AVX2 and
// AVX-512 builds, whose tails start at different elements.
namespace simd {
using F = at::vec::Vectorized<float>;
using D = at::vec::Vectorized<double>;
}  // namespace simd
#if defined(CPU_CAPABILITY_AVX512)
inline simd::F bf_min(const simd::F& a, const simd::F& b) { return _mm512_min_ps(b, a); }
inline simd::F bf_max(const simd::F& a, const simd::F& b) { return _mm512_max_ps(b, a); }
inline simd::D bf_min(const simd::D& a, const simd::D& b) { return _mm512_min_pd(b, a); }
inline simd::D bf_max(const simd::D& a, const simd::D& b) { return _mm512_max_pd(b, a); }
#elif defined(CPU_CAPABILITY_AVX2)
inline simd::F bf_min(const simd::F& a, const simd::F& b) { return _mm256_min_ps(b, a); }
inline simd::F bf_max(const simd::F& a, const simd::F& b) { return _mm256_max_ps(b, a); }
inline simd::D bf_min(const simd::D& a, const simd::D& b) { return _mm256_min_pd(b, a); }
inline simd::D bf_max(const simd::D& a, const simd::D& b) { return _mm256_max_pd(b, a); }
#endif
template <typename U>
inline at::vec::Vectorized<U> bf_min(const at::vec::Vectorized<U>& a, const at::vec::Vectorized<U>& b) {
  return at::vec::minimum(a, b);  // NaN-propagating, as the scalar version for a NaN in `a`
}
template <typename U>
inline at::vec::Vectorized<U> bf_max(const at::vec::Vectorized<U>& a, const at::vec::Vectorized<U>& b) {
  return at::vec::maximum(a, b);
}
template <typename U>
inline at::vec::Vectorized<U> bf_sqrt(const at::vec::Vectorized<U>& a) {
  return a.sqrt();
}
template <typename U>
inline at::vec::Vectorized<U> bf_select_gt(const at::vec::Vectorized<U>& a, const at::vec::Vectorized<U>& b,
                                           const at::vec::Vectorized<U>& x, const at::vec::Vectorized<U>& y) {
  return at::vec::Vectorized<U>::blendv(y, x, a > b);  // operator> gives an all-ones lane mask
}
}  // namespace bregman
#endif

namespace bregman {

// ---- the scalar arguments of one call -------------------------------------------------------
// The op's hyper-parameters (Python floats: doubles) and codes, checked and packed once at the op
// boundary (csrc/op_checks.h, make_step_hyper) and handed down whole. Everything per tensor in the
// compute type (StepParams below) is derived from it, in double, by make_step_params.
struct StepHyper {
  Kind kind = Kind::LinBreg;
  Reg reg = Reg::None;
  bool momentum = false;    // LinBreg with momentum buffers (exp_avgs given)
  Moments moments = Moments::Fp32;  // how exp_avgs / exp_avg_sqs are stored
  double lr = 0;            // τ (the capturable CUDA op reads it from a device tensor instead)
  double beta1 = 0;         // momentum β (LinBreg) or β1 (AdaBreg)
  double beta2 = 0;         // β2 (AdaBreg)
  double eps = 0;           // ε (AdaBreg)
  double delta = 1;         // δ of the Bregman methods (ProxSGD ignores it)
  double lamda_l1 = 0;      // λ₁: L1 strength of L1 / L1Pos / SparseGroup
  double lamda_group = 0;   // λ₂: the group strength per unit of √n; a row of n elements has the
                            // threshold λ₂·√n (StepParams::thr_row)
};

// The row threshold λ₂·√n (times τ for ProxSGD), in double like the reference's Python floats, so
// that its single rounding to the compute type matches. Once per tensor (host, or in-kernel on CUDA).
BF_HD double row_threshold(Kind kind, double lr, double lamda_group, int64_t n) {
  const double thr = lamda_group * ::sqrt(static_cast<double>(n));
  return kind == Kind::ProxSGD ? lr * thr : thr;
}

// StepParams::thr_row of a tensor with rows of n elements: row_threshold rounded once to T; 0 for
// the element-wise maps, which have no rows.
template <typename T>
BF_HD T make_thr_row(const StepHyper& h, int64_t n) {
  return is_row_reg(h.reg) ? static_cast<T>(row_threshold(h.kind, h.lr, h.lamda_group, n)) : T(0);
}

// ---- per-tensor constants of a step, in the compute type -------------------------------------
// Host code fills this once per tensor (bias corrections depend on that tensor's step count, the
// row threshold on its row length). The field names are those of contract.Hyper's derived constants
// and of the Triton backend's hyper table columns (bregman_fused/backends/triton/bregman_math.py
// HYPER_COLUMNS), which hold the same values (tests/test_contract.py).
template <typename T>
struct StepParams {
  T lr;           // τ
  T beta1;        // momentum β (LinBreg) or β1 (AdaBreg)
  T beta2;        // β2 (AdaBreg)
  T one_minus_beta1;  // AdaBreg: 1 − β1 and 1 − β2, formed in double and rounded once, as torch
  T one_minus_beta2;  // rounds the Python float the reference passes (1 − 0.999f is 1.3e-5 off)
  T eps;          // ε (AdaBreg)
  T step_size;    // AdaBreg: τ / (1 − β1^t)
  T bc2_sqrt;     // AdaBreg: √(1 − β2^t)
  T mom_scale;    // LinBreg with momentum: (1 − β)·τ
  T prox_delta;   // δ of θ = δ·shrink(x): δ for the Bregman methods, 1 for ProxSGD
  T thr_l1;       // element-wise threshold: λ₁ (Bregman) or τ·λ₁ (ProxSGD)
  T thr_row;      // the threshold of one row's norm: λ₂·√n (Bregman) or τ·λ₂·√n (ProxSGD), n the
                  // tensor's row length; 0 for the element-wise maps. NOT λ₂ itself (StepHyper::lamda_group).
};

// Fill the per-tensor constants exactly as reference.py computes them (in double, then cast), for
// a tensor at step count `step` (after this step's increment) with rows of n elements (1 for the
// element-wise maps). Host code calls it once per tensor; CUDA kernels call it in-kernel when lr or
// the step count live on the device (capturable, AMP with device steps). Double math is correctly
// rounded on both.
template <typename T>
BF_HD StepParams<T> make_step_params(const StepHyper& h, double step, int64_t n) {
  const double lr = h.lr, beta1 = h.beta1, beta2 = h.beta2;
  StepParams<T> p;
  p.lr = static_cast<T>(lr);
  p.beta1 = static_cast<T>(beta1);
  p.beta2 = static_cast<T>(beta2);
  p.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  p.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  p.eps = static_cast<T>(h.eps);
  p.step_size = static_cast<T>(h.kind == Kind::AdaBreg ? lr / (1.0 - ::pow(beta1, step)) : 0.0);
  p.bc2_sqrt = static_cast<T>(h.kind == Kind::AdaBreg ? ::sqrt(1.0 - ::pow(beta2, step)) : 1.0);
  p.mom_scale = static_cast<T>((1.0 - beta1) * lr);
  const bool prox_sgd = h.kind == Kind::ProxSGD;
  p.prox_delta = static_cast<T>(prox_sgd ? 1.0 : h.delta);
  p.thr_l1 = static_cast<T>(prox_sgd ? lr * h.lamda_l1 : h.lamda_l1);
  p.thr_row = make_thr_row<T>(h, n);
  return p;
}

// ---- dual / point updates: return the x that the proximal map is applied to ----------------
// LinBreg, β = 0:   v ← v − τ·g
template <typename T, typename S>
BF_HD T linbreg_update(T& v, T g, const StepParams<S>& hp) {
  v = v - T(hp.lr) * g;
  return v;
}

// LinBreg, β > 0:   m ← β·m + (1−β)·τ·g ;  v ← v − m
template <typename T, typename S>
BF_HD T linbreg_momentum_update(T& v, T& m, T g, const StepParams<S>& hp) {
  m = m * T(hp.beta1) + T(hp.mom_scale) * g;
  v = v - m;
  return v;
}

// torch.lerp(a, b, w) for a scalar weight, in torch's two-branch form (exact at w = 0 and w = 1);
// the branch is taken on the per-tensor constant, so SIMD lanes never diverge.
template <typename T, typename S>
BF_HD T bf_lerp(T a, T b, S w) {
  if (w < S(0.5)) return a + T(w) * (b - a);
  return b - (b - a) * T(S(1) - w);
}

// AdaBreg: m ← β1·m + (1−β1)·g ; s ← β2·s + (1−β2)·g² ;
//          v ← v − (τ/(1−β1^t)) · m / (√s/√(1−β2^t) + ε)
template <typename T, typename S>
BF_HD T adabreg_update(T& v, T& m, T& s, T g, const StepParams<S>& hp) {
  m = bf_lerp(m, g, hp.one_minus_beta1);  // the reference's m.lerp_(g, 1 − β1)
  s = s * T(hp.beta2) + T(hp.one_minus_beta2) * g * g;
  const T denom = bf_sqrt(s) / T(hp.bc2_sqrt) + T(hp.eps);
  v = v - T(hp.step_size) * (m / denom);
  return v;
}

// ProxSGD: the point θ − τ·g that prox_{τJ} is applied to (θ is not stored in a state)
template <typename T, typename S>
BF_HD T proxsgd_point(T theta, T g, const StepParams<S>& hp) {
  return theta - T(hp.lr) * g;
}

// One element's step for optimizer K (MOMENTUM: LinBreg with β > 0): updates the states in place
// and returns the point x the proximal map is applied to. States a kind does not use are ignored
// (pass dummies); `theta` is only read by ProxSGD.
template <Kind K, bool MOMENTUM, typename T, typename S>
BF_HD T update_point(T g, T theta, T& v, T& m, T& s, const StepParams<S>& hp) {
  if constexpr (K == Kind::LinBreg) {
    if constexpr (MOMENTUM) {
      return linbreg_momentum_update(v, m, g, hp);
    } else {
      return linbreg_update(v, g, hp);
    }
  } else if constexpr (K == Kind::AdaBreg) {
    return adabreg_update(v, m, s, g, hp);
  } else {
    return proxsgd_point(theta, g, hp);
  }
}

// ---- proximal maps ---------------------------------------------------------------------------
// soft-threshold sign(x)·max(|x| − thr, 0), written as x − clamp(x, −thr, thr): branch-free and
// bit-identical to the reference's form (both round x ∓ thr once).
template <typename T>
BF_HD T soft_threshold(T x, T thr) {
  return x - bf_min(bf_max(x, T(0) - thr), thr);
}

// The element-wise part of the map: the full map for None/L1/L1Pos, the L1 part of SparseGroup,
// identity for Group (the row factor follows in row_factor_thr). The result still has to be scaled
// by δ (element-wise maps, elementwise_theta) or by δ·factor (row maps, row_theta).
template <typename T, typename S>
BF_HD T elementwise_shrink(Reg reg, T x, const StepParams<S>& hp) {
  switch (reg) {
    case Reg::L1:
    case Reg::SparseGroup:
      return soft_threshold(x, T(hp.thr_l1));
    case Reg::L1Pos:
      return bf_max(x - T(hp.thr_l1), T(0));
    default:
      return x;
  }
}

// θ of the element-wise maps: shrink(x)·δ, in the reference's order (prox = shrink(v, 1) * delta).
template <typename T, typename S>
BF_HD T elementwise_theta(Reg reg, T x, const StepParams<S>& hp) {
  return elementwise_shrink(reg, x, hp) * T(hp.prox_delta);
}

// θ of a row map from the element-wise part u and the row's factor: (u·factor)·δ, the reference's order.
template <typename T, typename S>
BF_HD T row_theta(T u, T factor, const StepParams<S>& hp) {
  return (u * factor) * T(hp.prox_delta);
}

// Row maps: θ_r = δ·u_r·factor with factor = max(1 − thr/‖u_r‖, 0) (0 for a zero row), from the
// row's norm and the row threshold thr = StepParams::thr_row. S may be a SIMD type: the CPU kernel
// computes the factors of a vector of rows at once (thr/0 = inf in a zero row's lane is discarded
// by the select).
template <typename S>
BF_HD S row_factor_norm(S norm, S thr) {
  return bf_select_gt(norm, thr, S(1) - thr / norm, S(0));
}

// The same from Σu², accumulated by the kernel in the compute type: ‖u_r‖ = √Σu². [note: one-element
// rows] A row of one element (GroupL1L2 on a bias) has the norm |u| instead, as torch's vector_norm
// gives it: √(u²) is |u| exactly, except where u² leaves the normal range (|u| < 2⁻⁶³ in float32,
// 1.1e-19, or |u| ≥ 2⁶⁴), where it would read as 0 or inf; the kernels pass |u| to row_factor_norm.
template <typename S>
BF_HD S row_factor_thr(S sum_sq, S thr) {
  return row_factor_norm(bf_sqrt(sum_sq), thr);
}

}  // namespace bregman
