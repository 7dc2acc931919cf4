// The row maps of the CPU kernel (Group, SparseGroup): the sink that collects u = the element-wise
// part of the map in a scratch buffer, the per-row reductions Σu², the row factors, and the write
// of θ = (u·factor)·δ. run_chunk (kernel.h) strings them together, see [note: row maps in one pass].
#pragma once

#include "simd_memory.h"  // first: see there

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "bregman_math.h"
#include "work.h"

namespace bregman::cpu::detail {

// Row maps, first pass: u = the element-wise part of the map (identity for Group), to scratch.
template <typename scalar_t, Reg R>
struct ScratchSink {
  using M = Mem<scalar_t>;
  using T = typename M::T;
  using Vec = typename M::Vec;
  T* u;           // u[i - base]
  int64_t base;
  const StepParams<T>& hp;

  int64_t peel(int64_t, int64_t) const { return 0; }
  void vec(int64_t i, Vec x0, Vec x1) {
    elementwise_shrink(R, x0, hp).store(u + i - base);
    elementwise_shrink(R, x1, hp).store(u + i - base + M::kVec);
  }
  void one(int64_t i, T x) { u[i - base] = elementwise_shrink(R, x, hp); }
};

// [note: width-independent sums] Σu² in the same order whatever the vector width, so that the
// AVX2 and AVX-512 builds give bit-identical row norms: 64 bytes of u per iteration (16 floats),
// each position accumulated in its own lane (two 256-bit vectors, or one 512-bit), then position k
// and k + half added, then those summed in order (the order of the AVX2 kernel before AVX-512).
template <typename T>
T sum_squares(const T* u, int64_t len) {
  using Vec = Vectorized<T>;
  constexpr int64_t kVec = Vec::size();
  constexpr int64_t kSpan = 64 / static_cast<int64_t>(sizeof(T));
  constexpr int64_t kParts = kSpan / kVec;
  static_assert(kParts >= 1 && kParts * kVec == kSpan, "vectors of at most 64 bytes");
  int64_t i = 0;
  T total = 0;
  if (len >= kSpan) {
    Vec acc[kParts];
    for (int64_t p = 0; p < kParts; ++p) acc[p] = Vec(T(0));
    for (; i + kSpan <= len; i += kSpan) {
      for (int64_t p = 0; p < kParts; ++p) {
        const Vec x = Vec::loadu(u + i + p * kVec);
        acc[p] = acc[p] + x * x;
      }
    }
    T buf[kSpan];
    for (int64_t p = 0; p < kParts; ++p) acc[p].store(buf + p * kVec);
    for (int64_t k = 0; k < kSpan / 2; ++k) total += buf[k] + buf[k + kSpan / 2];
  }
  for (; i < len; ++i) total += u[i] * u[i];
  return total;
}

// Short rows (n < 16, e.g. 3×3 kernels): loops unrolled for a compile-time n; with a run-time n
// the compiler's loop set-up per row costs more than the row itself.
template <int N, typename T>
void short_rows(const T* u, int64_t rows, T* sums, const T* f, T* out) {
  if (sums != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = u + r * N;
      T acc = x[0] * x[0];
      for (int j = 1; j < N; ++j) acc = acc + x[j] * x[j];
      sums[r] = acc;
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      for (int j = 0; j < N; ++j) out[r * N + j] = f[r];
    }
  }
}

// sums != nullptr: sums[r] = Σ_j u[r·n + j]²; else out[r·n + j] = f[r] (broadcast of row factors).
template <typename T>
void short_rows(int64_t n, const T* u, int64_t rows, T* sums, const T* f, T* out) {
  switch (n) {
#define BF_SHORT_ROW_CASE(N) \
  case N:                    \
    return short_rows<N>(u, rows, sums, f, out);
    BF_SHORT_ROW_CASE(2) BF_SHORT_ROW_CASE(3) BF_SHORT_ROW_CASE(4) BF_SHORT_ROW_CASE(5) BF_SHORT_ROW_CASE(6)
    BF_SHORT_ROW_CASE(7) BF_SHORT_ROW_CASE(8) BF_SHORT_ROW_CASE(9) BF_SHORT_ROW_CASE(10) BF_SHORT_ROW_CASE(11)
    BF_SHORT_ROW_CASE(12) BF_SHORT_ROW_CASE(13) BF_SHORT_ROW_CASE(14) BF_SHORT_ROW_CASE(15)
#undef BF_SHORT_ROW_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "short_rows: n = ", n);
  }
}

constexpr int64_t kShortRow = 16;

// out[r] = Σ_j u[r·n + j]² for the rows of a group; for rows of one element their norm |u| itself
// (bregman_math.h [note: one-element rows]): row_factors takes either, by n.
template <typename T>
void row_sums(const T* u, int64_t rows, int64_t n, T* out) {
  using Vec = Vectorized<T>;
  if (n == 1) {
    int64_t r = 0;
    for (; r + Vec::size() <= rows; r += Vec::size()) Vec::loadu(u + r).abs().store(out + r);
    for (; r < rows; ++r) out[r] = std::abs(u[r]);
  } else if (n < kShortRow) {
    short_rows<T>(n, u, rows, out, nullptr, nullptr);
  } else {
    for (int64_t r = 0; r < rows; ++r) out[r] = sum_squares(u + r * n, n);
  }
}

// out[r·n + j] = f[r]: the row factors per element, so the θ sweep is one vector loop.
template <typename T>
void broadcast_rows(const T* f, int64_t rows, int64_t n, T* out) {
  if (n < kShortRow) return short_rows<T>(n, nullptr, rows, nullptr, f, out);
  for (int64_t r = 0; r < rows; ++r) std::fill(out + r * n, out + (r + 1) * n, f[r]);
}

// f[r] = row_sums' value of row r on entry (Σu², or |u| for rows of n = 1 element), its row factor
// on exit (vectorized over rows).
template <typename T>
void row_factors(T* f, int64_t rows, int64_t n, T thr) {
  using Vec = Vectorized<T>;
  const Vec vthr(thr);
  int64_t r = 0;
  if (n == 1) {
    for (; r + Vec::size() <= rows; r += Vec::size()) row_factor_norm(Vec::loadu(f + r), vthr).store(f + r);
    for (; r < rows; ++r) f[r] = row_factor_norm(f[r], thr);
    return;
  }
  for (; r + Vec::size() <= rows; r += Vec::size()) row_factor_thr(Vec::loadu(f + r), vthr).store(f + r);
  for (; r < rows; ++r) f[r] = row_factor_thr(f[r], thr);
}

// Row maps, last pass: θ[b + j] = (u[j]·factor[j])·δ, non-zeros counted.
template <typename scalar_t>
int64_t write_rows(scalar_t* theta, int64_t b, int64_t len, const opmath_t<scalar_t>* u,
                   const opmath_t<scalar_t>* factor, const StepParams<opmath_t<scalar_t>>& hp, bool stream) {
  using M = Mem<scalar_t>;
  using T = typename M::T;
  using Vec = typename M::Vec;
  constexpr int64_t kVec = M::kVec;
  scalar_t* out = theta + b;
  NonZeros<T> nnz;
  int64_t j = 0;
  const int64_t peel_end = M::peel(out, len, stream);
  for (; j < peel_end; ++j) nnz.add_one(M::store1(out + j, row_theta(u[j], factor[j], hp)));
  for (; j + M::kStep <= len; j += M::kStep) {
    M::store(out + j, row_theta(Vec::loadu(u + j), Vec::loadu(factor + j), hp),
             row_theta(Vec::loadu(u + j + kVec), Vec::loadu(factor + j + kVec), hp), stream, nnz);
  }
  for (; j < len; ++j) nnz.add_one(M::store1(out + j, row_theta(u[j], factor[j], hp)));
  return nnz.total();
}

// Rows too long for the scratch buffer: u of [b, e) again, from the updated dual (Bregman) or
// from the untouched θ and g (ProxSGD, whose first pass wrote nothing).
template <typename scalar_t, typename grad_t, Kind K, Reg R>
void recompute_u(const TensorWork<opmath_t<scalar_t>>& t, int64_t b, int64_t e, bool has_scale,
                 opmath_t<scalar_t> scale, opmath_t<scalar_t>* u) {
  using M = Mem<scalar_t>;
  using T = typename M::T;
  using Vec = typename M::Vec;
  constexpr int64_t kVec = M::kVec;
  int64_t i = b;
  if constexpr (K == Kind::ProxSGD) {
    using G = GradMem<scalar_t, grad_t>;
    const grad_t* grad = static_cast<const grad_t*>(t.grad);
    const scalar_t* theta = static_cast<const scalar_t*>(t.theta);
    const Vec vscale(scale);
    for (; i + M::kStep <= e; i += M::kStep) {
      Vec g0, g1, th0, th1;
      G::load(grad + i, g0, g1);
      M::load(theta + i, th0, th1);
      if (has_scale) {
        g0 = g0 / vscale;
        g1 = g1 / vscale;
      }
      elementwise_shrink(R, proxsgd_point(th0, g0, t.hp), t.hp).store(u + i - b);
      elementwise_shrink(R, proxsgd_point(th1, g1, t.hp), t.hp).store(u + i - b + kVec);
    }
    for (; i < e; ++i) {
      T g = G::load1(grad + i);
      if (has_scale) g = g / scale;
      u[i - b] = elementwise_shrink(R, proxsgd_point(M::load1(theta + i), g, t.hp), t.hp);
    }
  } else {
    for (; i + kVec <= e; i += kVec) elementwise_shrink(R, Vec::loadu(t.v + i), t.hp).store(u + i - b);
    for (; i < e; ++i) u[i - b] = elementwise_shrink(R, t.v[i], t.hp);
  }
}

}  // namespace bregman::cpu::detail
