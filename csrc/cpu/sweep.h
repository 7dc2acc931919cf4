// The element-wise walk of the CPU kernel: one pass over [b, e) of a tensor that updates the
// states in place (the per-element math of csrc/bregman_math.h, SIMD body and scalar tail) and
// hands the point x of each element to a sink; the sink of the element-wise maps writes θ.
#pragma once

#include "simd_memory.h"  // first: see there

#include <cstdint>

#include "bregman_math.h"
#include "work.h"

namespace bregman::cpu::detail {

// ---- the update sweep: states in place, the point x handed to a sink --------------------------
// A Sink provides vec(i, x0, x1) for elements [i, i + kStep) and one(i, x) for element i, and
// peel(b, e): how many leading elements it wants one by one (store alignment).
template <typename scalar_t, typename grad_t, Kind K, bool MOM, typename Sink>
inline void sweep(const TensorWork<opmath_t<scalar_t>>& t, int64_t b, int64_t e, bool has_scale,
                  opmath_t<scalar_t> scale, Sink& sink) {
  using M = Mem<scalar_t>;
  using G = GradMem<scalar_t, grad_t>;
  using T = typename M::T;
  using Vec = typename M::Vec;
  constexpr int64_t kVec = M::kVec;
  constexpr bool kHasM = K == Kind::AdaBreg || (K == Kind::LinBreg && MOM);
  constexpr bool kHasS = K == Kind::AdaBreg;
  constexpr bool kHasV = K != Kind::ProxSGD;
  const auto& hp = t.hp;
  const grad_t* grad = static_cast<const grad_t*>(t.grad);
  const scalar_t* theta = static_cast<const scalar_t*>(t.theta);
  T* v = t.v;
  T* m = t.m;
  T* s = t.s;

  auto one = [&](int64_t i) {
    T g = G::load1(grad + i);
    if (has_scale) g = g / scale;
    T th = kHasV ? T(0) : M::load1(theta + i);
    T vv = kHasV ? v[i] : T(0);
    T mm = kHasM ? m[i] : T(0);
    T ss = kHasS ? s[i] : T(0);
    const T x = update_point<K, MOM>(g, th, vv, mm, ss, hp);
    if constexpr (kHasV) v[i] = vv;
    if constexpr (kHasM) m[i] = mm;
    if constexpr (kHasS) s[i] = ss;
    sink.one(i, x);
  };

  int64_t i = b;
  const int64_t peel_end = b + sink.peel(b, e);
  for (; i < peel_end; ++i) one(i);
  const Vec vscale(scale);
  for (; i + M::kStep <= e; i += M::kStep) {
    Vec g0, g1;
    G::load(grad + i, g0, g1);
    if (has_scale) {
      g0 = g0 / vscale;
      g1 = g1 / vscale;
    }
    Vec th0(T(0)), th1(T(0)), v0(T(0)), v1(T(0)), m0(T(0)), m1(T(0)), s0(T(0)), s1(T(0));
    if constexpr (!kHasV) M::load(theta + i, th0, th1);
    if constexpr (kHasV) {
      v0 = Vec::loadu(v + i);
      v1 = Vec::loadu(v + i + kVec);
    }
    if constexpr (kHasM) {
      m0 = Vec::loadu(m + i);
      m1 = Vec::loadu(m + i + kVec);
    }
    if constexpr (kHasS) {
      s0 = Vec::loadu(s + i);
      s1 = Vec::loadu(s + i + kVec);
    }
    const Vec x0 = update_point<K, MOM>(g0, th0, v0, m0, s0, hp);
    const Vec x1 = update_point<K, MOM>(g1, th1, v1, m1, s1, hp);
    if constexpr (kHasV) {
      v0.store(v + i);
      v1.store(v + i + kVec);
    }
    if constexpr (kHasM) {
      m0.store(m + i);
      m1.store(m + i + kVec);
    }
    if constexpr (kHasS) {
      s0.store(s + i);
      s1.store(s + i + kVec);
    }
    sink.vec(i, x0, x1);
  }
  for (; i < e; ++i) one(i);
}

// Element-wise maps: θ = δ·shrink(x) written straight to the parameter, non-zeros counted.
template <typename scalar_t, Reg R>
struct ThetaSink {
  using M = Mem<scalar_t>;
  using T = typename M::T;
  using Vec = typename M::Vec;
  scalar_t* theta;
  const StepParams<T>& hp;
  bool stream;
  NonZeros<T> nnz;

  int64_t peel(int64_t b, int64_t e) const { return M::peel(theta + b, e - b, stream); }
  void vec(int64_t i, Vec x0, Vec x1) {
    M::store(theta + i, elementwise_theta(R, x0, hp), elementwise_theta(R, x1, hp), stream, nnz);
  }
  void one(int64_t i, T x) { nnz.add_one(M::store1(theta + i, elementwise_theta(R, x, hp))); }
  int64_t total() const { return nnz.total(); }
};

}  // namespace bregman::cpu::detail
