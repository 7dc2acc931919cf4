// Multi-tensor CPU kernel of bregman_fused::fused_step: memory access, chunking and threading.
//
// The math is csrc/bregman_math.h; this file only moves data: it loads g, θ and the states into
// the compute type (float, or double for float64 params), calls the same templated math for the
// SIMD body (at::vec::Vectorized) and the scalar tail, stores the results, and counts the
// non-zeros of θ as it writes them. One call = one pass over every tensor of the bucket.
//
// Instantiated once per parameter dtype in kernel_<dtype>.cpp (four small translation units
// that compile in parallel).
#pragma once

#define BREGMAN_MATH_AT_VEC
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bregman_math.h"
#include "work.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace bregman::cpu {

namespace detail {

using at::vec::Vectorized;

// Elements per work chunk (element-wise maps) and per row-group scratch buffer (row maps).
// 32 K floats of each of g, v, m, s is ~0.5 MB: a chunk's rows stay in L2 between the passes of
// the row maps, and ~350 chunks for ResNet-18 balance two to many threads.
constexpr int64_t kChunk = 32768;
constexpr int64_t kScratch = 8192;
// Per-chunk weight added to its element count when splitting work over threads (call overhead).
constexpr int64_t kChunkOverhead = 64;
// Below this many weighted elements the whole call runs on the calling thread.
constexpr int64_t kParallelGrain = 32768;
constexpr uintptr_t kStreamAlign = 32;

#if defined(CPU_CAPABILITY_AVX2)
// One 256-bit store of float or double lanes (streaming or not), and the lane bits of the non-zero
// lanes: unordered not-equal, so NaN counts and −0 does not, like torch.count_nonzero.
inline void store256(float* p, __m256 x, bool stream) { stream ? _mm256_stream_ps(p, x) : _mm256_storeu_ps(p, x); }
inline void store256(double* p, __m256d x, bool stream) { stream ? _mm256_stream_pd(p, x) : _mm256_storeu_pd(p, x); }
inline int nonzero_bits(__m256 x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_UQ)); }
inline int nonzero_bits(__m256d x) { return _mm256_movemask_pd(_mm256_cmp_pd(x, _mm256_setzero_pd(), _CMP_NEQ_UQ)); }
#endif

// ---- memory access: param dtype <-> compute type --------------------------------------------
template <typename scalar_t>
struct Mem {
  using T = opmath_t<scalar_t>;
  using Vec = Vectorized<T>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kStep = 2 * kVec;  // elements per iteration of a vector body
  static constexpr bool kReduced = !std::is_same_v<scalar_t, T>;

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      at::vec::load_to_float<scalar_t>(p, a, b);
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec);
    }
  }

  // Stores a, b to p (rounding to the param dtype like Tensor.to()) and counts the non-zeros of
  // the values as stored, which is what the count must see (a tiny float can round to 0 in half).
  // [note: counting on the stored bits] With AVX2 the count is taken from the stored vector itself
  // (a compare + movemask + popcount), not by widening it back to float and comparing lanes: for
  // bf16/fp16 that round trip cost more than the rest of a ProxSGD step.
  template <typename Counter>
  static void store(scalar_t* p, const Vec& a, const Vec& b, bool stream, Counter& nnz) {
    if constexpr (kReduced) {
      auto h = at::vec::convert_from_float<scalar_t>(a, b);
#if defined(CPU_CAPABILITY_AVX2)
      const __m256i bits = h;
      if (stream) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
      }
      // ±0 is all-zero but the sign bit; NaN and subnormals count, like torch.count_nonzero
      const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi16(0x7fff));
      const __m256i is_zero = _mm256_cmpeq_epi16(magnitude, _mm256_setzero_si256());
      nnz.add(2 * kVec - __builtin_popcount(static_cast<unsigned>(_mm256_movemask_epi8(is_zero))) / 2);
#else
      (void)stream;
      h.store(p);
      auto [a2, b2] = at::vec::convert_to_float<scalar_t>(h);
      nnz.add(a2, b2);
#endif
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      store256(p, a, stream);
      store256(p + kVec, b, stream);
      nnz.add(__builtin_popcount(static_cast<unsigned>(nonzero_bits(a) | (nonzero_bits(b) << kVec))));
#else
      (void)stream;
      a.store(p);
      b.store(p + kVec);
      nnz.add(a, b);
#endif
    }
  }

  static T load1(const scalar_t* p) { return static_cast<T>(*p); }
  static T store1(scalar_t* p, T x) {
    const scalar_t y = static_cast<scalar_t>(x);
    *p = y;
    return static_cast<T>(y);
  }

  // Elements to handle one by one from p before a streaming vector store is aligned.
  static int64_t peel(const scalar_t* p, int64_t len, bool stream) {
    if (!stream) return 0;
    const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % kStreamAlign;
    if (mis == 0) return 0;
    if (mis % sizeof(scalar_t) != 0) return len;  // cannot align: all scalar
    return std::min<int64_t>(len, static_cast<int64_t>((kStreamAlign - mis) / sizeof(scalar_t)));
  }
};

template <typename T>
int64_t lanes_sum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T total = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) total += buf[k];
  return static_cast<int64_t>(total);
}

// Non-zeros written by one chunk: exact integer counts from the AVX2 stores, lane masks summed in
// the compute type otherwise (exact: a chunk holds far fewer than 2^24 elements per lane).
template <typename T>
struct NonZeros {
  int64_t n = 0;
  Vectorized<T> lanes = Vectorized<T>(T(0));
  void add(int64_t k) { n += k; }
  void add(const Vectorized<T>& a, const Vectorized<T>& b) {
    const Vectorized<T> zero(T(0));
    lanes = lanes + a.ne(zero) + b.ne(zero);
  }
  void add_one(T stored) { n += stored != T(0); }
  int64_t total() const { return n + lanes_sum(lanes); }
};

// ---- the update sweep: states in place, the point x handed to a sink --------------------------
// A Sink provides vec(i, x0, x1) for elements [i, i + kStep) and one(i, x) for element i, and
// peel(b, e): how many leading elements it wants one by one (store alignment).
template <typename scalar_t, Kind K, bool MOM, typename Sink>
inline void sweep(const TensorWork<opmath_t<scalar_t>>& t, int64_t b, int64_t e, bool has_scale,
                  opmath_t<scalar_t> scale, Sink& sink) {
  using M = Mem<scalar_t>;
  using T = typename M::T;
  using Vec = typename M::Vec;
  constexpr int64_t kVec = M::kVec;
  constexpr bool kHasM = K == Kind::AdaBreg || (K == Kind::LinBreg && MOM);
  constexpr bool kHasS = K == Kind::AdaBreg;
  constexpr bool kHasV = K != Kind::ProxSGD;
  const auto& hp = t.hp;
  const scalar_t* grad = static_cast<const scalar_t*>(t.grad);
  const scalar_t* theta = static_cast<const scalar_t*>(t.theta);
  T* v = t.v;
  T* m = t.m;
  T* s = t.s;

  auto one = [&](int64_t i) {
    T g = M::load1(grad + i);
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
    M::load(grad + i, g0, g1);
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

template <typename T>
T sum_squares(const T* u, int64_t len) {
  using Vec = Vectorized<T>;
  constexpr int64_t kVec = Vec::size();
  int64_t i = 0;
  T total = 0;
  if (len >= 2 * kVec) {
    Vec a(T(0)), b(T(0));
    for (; i + 2 * kVec <= len; i += 2 * kVec) {
      const Vec x = Vec::loadu(u + i);
      const Vec y = Vec::loadu(u + i + kVec);
      a = a + x * x;
      b = b + y * y;
    }
    T buf[kVec];
    (a + b).store(buf);
    for (int64_t k = 0; k < kVec; ++k) total += buf[k];
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

// out[r] = Σ_j u[r·n + j]² for the rows of a group.
template <typename T>
void row_sums(const T* u, int64_t rows, int64_t n, T* out) {
  using Vec = Vectorized<T>;
  if (n == 1) {
    int64_t r = 0;
    for (; r + Vec::size() <= rows; r += Vec::size()) {
      const Vec x = Vec::loadu(u + r);
      (x * x).store(out + r);
    }
    for (; r < rows; ++r) out[r] = u[r] * u[r];
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

// f[r] = Σu² of row r on entry, its row factor on exit (row_factor_thr, vectorized over rows).
template <typename T>
void row_factors(T* f, int64_t rows, T thr) {
  using Vec = Vectorized<T>;
  const Vec vthr(thr);
  int64_t r = 0;
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
template <typename scalar_t, Kind K, Reg R>
void recompute_u(const TensorWork<opmath_t<scalar_t>>& t, int64_t b, int64_t e, bool has_scale,
                 opmath_t<scalar_t> scale, opmath_t<scalar_t>* u) {
  using M = Mem<scalar_t>;
  using T = typename M::T;
  using Vec = typename M::Vec;
  constexpr int64_t kVec = M::kVec;
  int64_t i = b;
  if constexpr (K == Kind::ProxSGD) {
    const scalar_t* grad = static_cast<const scalar_t*>(t.grad);
    const scalar_t* theta = static_cast<const scalar_t*>(t.theta);
    const Vec vscale(scale);
    for (; i + M::kStep <= e; i += M::kStep) {
      Vec g0, g1, th0, th1;
      M::load(grad + i, g0, g1);
      M::load(theta + i, th0, th1);
      if (has_scale) {
        g0 = g0 / vscale;
        g1 = g1 / vscale;
      }
      elementwise_shrink(R, proxsgd_point(th0, g0, t.hp), t.hp).store(u + i - b);
      elementwise_shrink(R, proxsgd_point(th1, g1, t.hp), t.hp).store(u + i - b + kVec);
    }
    for (; i < e; ++i) {
      T g = M::load1(grad + i);
      if (has_scale) g = g / scale;
      u[i - b] = elementwise_shrink(R, proxsgd_point(M::load1(theta + i), g, t.hp), t.hp);
    }
  } else {
    for (; i + kVec <= e; i += kVec) elementwise_shrink(R, Vec::loadu(t.v + i), t.hp).store(u + i - b);
    for (; i < e; ++i) u[i - b] = elementwise_shrink(R, t.v[i], t.hp);
  }
}

// One chunk [b, e) of tensor t (whole rows for the row maps); returns the non-zeros written.
// u, factor, row_f: kScratch elements each of per-thread scratch.
template <typename scalar_t, Kind K, bool MOM, Reg R>
int64_t run_chunk(const Work<opmath_t<scalar_t>>& w, const TensorWork<opmath_t<scalar_t>>& t, int64_t b,
                  int64_t e, opmath_t<scalar_t>* u, opmath_t<scalar_t>* factor, opmath_t<scalar_t>* row_f) {
  using T = opmath_t<scalar_t>;
  scalar_t* theta = static_cast<scalar_t*>(t.theta);
  if constexpr (!is_row_reg(R)) {
    ThetaSink<scalar_t, R> sink{theta, t.hp, w.stream};
    sweep<scalar_t, K, MOM>(t, b, e, w.has_scale, w.scale, sink);
    return sink.total();
  } else {
    const int64_t n = t.n;
    int64_t nnz = 0;
    if (n <= kScratch) {
      // [note: row maps in one pass] update a group of whole rows into the scratch buffer u (v, m,
      // s read and written once), reduce each row's Σu² from the cache-resident scratch, compute
      // the row factors 8 rows at a time (a scalar sqrt + divide per row would dominate short
      // rows such as 3×3 kernels), broadcast them per element, then write θ in one vector sweep.
      const int64_t rows_per_group = kScratch / n;
      for (int64_t gb = b; gb < e; gb += rows_per_group * n) {
        const int64_t ge = std::min(e, gb + rows_per_group * n);
        const int64_t rows = (ge - gb) / n;
        ScratchSink<scalar_t, R> sink{u, gb, t.hp};
        sweep<scalar_t, K, MOM>(t, gb, ge, w.has_scale, w.scale, sink);
        row_sums(u, rows, n, row_f);
        row_factors(row_f, rows, t.row_thr);
        const T* f = row_f;
        if (n > 1) {
          broadcast_rows(row_f, rows, n, factor);
          f = factor;
        }
        nnz += write_rows<scalar_t>(theta, gb, ge - gb, u, f, t.hp, w.stream);
      }
    } else {
      // a row longer than the scratch buffer (run_all gives it a chunk of its own): update it block
      // by block while accumulating Σu², then a second sweep that recomputes u and writes θ
      double sum_sq = 0;
      for (int64_t bb = b; bb < e; bb += kScratch) {
        const int64_t be = std::min(e, bb + kScratch);
        if constexpr (K == Kind::ProxSGD) {
          recompute_u<scalar_t, K, R>(t, bb, be, w.has_scale, w.scale, u);
        } else {
          ScratchSink<scalar_t, R> sink{u, bb, t.hp};
          sweep<scalar_t, K, MOM>(t, bb, be, w.has_scale, w.scale, sink);
        }
        sum_sq += static_cast<double>(sum_squares(u, be - bb));
      }
      const T f = row_factor_thr(static_cast<T>(sum_sq), t.row_thr);
      std::fill(factor, factor + kScratch, f);
      for (int64_t bb = b; bb < e; bb += kScratch) {
        const int64_t be = std::min(e, bb + kScratch);
        recompute_u<scalar_t, K, R>(t, bb, be, w.has_scale, w.scale, u);
        nnz += write_rows<scalar_t>(theta, bb, be - bb, u, factor, t.hp, w.stream);
      }
    }
    return nnz;
  }
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename scalar_t, Kind K, bool MOM, Reg R>
void run_all(const Work<opmath_t<scalar_t>>& w, int64_t* counts) {
  using T = opmath_t<scalar_t>;
  // work list: element-wise maps in kChunk pieces, row maps in whole rows of ~kChunk elements
  std::vector<Chunk> chunks;
  std::vector<int64_t> starts;  // weighted start offset of each chunk, for the thread split
  int64_t total = 0;
  for (int64_t ti = 0; ti < static_cast<int64_t>(w.tensors.size()); ++ti) {
    const auto& t = w.tensors[ti];
    if (t.numel == 0) continue;
    // a row longer than the scratch buffer is a chunk of its own (run_chunk's two-sweep path reduces
    // one norm per chunk); shorter rows are packed whole, ~kChunk elements per chunk
    const int64_t step = !is_row_reg(R) ? kChunk : t.n > kScratch ? t.n : std::max<int64_t>(1, kChunk / t.n) * t.n;
    for (int64_t b = 0; b < t.numel; b += step) {
      const int64_t e = std::min(t.numel, b + step);
      chunks.push_back({ti, b, e});
      starts.push_back(total);
      total += (e - b) + kChunkOverhead;
    }
  }
  std::vector<int64_t> chunk_nnz(chunks.size(), 0);
  at::parallel_for(0, total, kParallelGrain, [&](int64_t lo, int64_t hi) {
    // this range owns the chunks that start in [lo, hi)
    auto c = static_cast<int64_t>(std::lower_bound(starts.begin(), starts.end(), lo) - starts.begin());
    std::vector<T> scratch;
    if (is_row_reg(R)) scratch.resize(3 * kScratch);
    for (; c < static_cast<int64_t>(chunks.size()) && starts[c] < hi; ++c) {
      const Chunk& ch = chunks[c];
      chunk_nnz[c] = run_chunk<scalar_t, K, MOM, R>(w, w.tensors[ch.tensor], ch.begin, ch.end, scratch.data(),
                                                     scratch.data() + kScratch, scratch.data() + 2 * kScratch);
    }
#if defined(CPU_CAPABILITY_AVX2)
    if (w.stream) _mm_sfence();  // order the non-temporal stores before the join
#endif
  });
  for (size_t c = 0; c < chunks.size(); ++c) counts[chunks[c].tensor] += chunk_nnz[c];
}

template <typename scalar_t, Kind K, bool MOM>
void dispatch_reg(const Work<opmath_t<scalar_t>>& w, int64_t* counts) {
  switch (w.reg) {
    case Reg::None: return run_all<scalar_t, K, MOM, Reg::None>(w, counts);
    case Reg::L1: return run_all<scalar_t, K, MOM, Reg::L1>(w, counts);
    case Reg::L1Pos: return run_all<scalar_t, K, MOM, Reg::L1Pos>(w, counts);
    case Reg::Group: return run_all<scalar_t, K, MOM, Reg::Group>(w, counts);
    case Reg::SparseGroup: return run_all<scalar_t, K, MOM, Reg::SparseGroup>(w, counts);
  }
}

}  // namespace detail

template <typename scalar_t>
void run_fused_step(const Work<opmath_t<scalar_t>>& w, int64_t* counts) {
  switch (w.kind) {
    case Kind::LinBreg:
      if (w.momentum) return detail::dispatch_reg<scalar_t, Kind::LinBreg, true>(w, counts);
      return detail::dispatch_reg<scalar_t, Kind::LinBreg, false>(w, counts);
    case Kind::AdaBreg:
      return detail::dispatch_reg<scalar_t, Kind::AdaBreg, false>(w, counts);
    case Kind::ProxSGD:
      return detail::dispatch_reg<scalar_t, Kind::ProxSGD, false>(w, counts);
  }
}

}  // namespace bregman::cpu
