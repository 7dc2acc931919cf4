// Multi-tensor CPU kernel of bregman_fused::fused_step: chunking, threading and the choice of
// the compiled variant (kind, momentum, regularizer).
//
// The math is csrc/bregman_math.h; the kernel only moves data: it loads g, θ and the states into
// the compute type (float, or double for float64 params; simd_memory.h), calls the same templated
// math for the SIMD body (at::vec::Vectorized) and the scalar tail (sweep.h), stores the results
// (element-wise maps: sweep.h's ThetaSink; row maps: row_maps.h), and counts the non-zeros of θ as
// it writes them. One call = one pass over every tensor of the bucket.
//
// Instantiated once per (parameter dtype, grad dtype) pair in kernel_<dtype>.cpp: each param dtype
// with grads of its own dtype, and bf16/fp16 params with float32 grads (kernel_<dtype>_float_grad.cpp;
// csrc/grad_dtypes.h [note: grad dtypes]). Six small translation units that compile in parallel.
#pragma once

#include "simd_memory.h"  // first: see there

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "bregman_math.h"
#include "moment_rows.h"
#include "moment_sweep.h"
#include "row_maps.h"
#include "sweep.h"
#include "work.h"

namespace bregman::cpu {

namespace detail {

// Elements per work chunk (element-wise maps) and per row-group scratch buffer (row maps).
// 32 K floats of each of g, v, m, s is ~0.5 MB: a chunk's rows stay in L2 between the passes of
// the row maps, and ~350 chunks for ResNet-18 balance two to many threads.
constexpr int64_t kChunk = 32768;
constexpr int64_t kScratch = 8192;
// Per-chunk weight added to its element count when splitting work over threads (call overhead).
constexpr int64_t kChunkOverhead = 64;
// Below this many weighted elements the whole call runs on the calling thread.
constexpr int64_t kParallelGrain = 32768;

// One chunk [b, e) of tensor t (whole rows for the row maps); returns the non-zeros written.
// u, factor, row_f: kScratch elements each of per-thread scratch. F: how the moments are stored
// (moment_sweep.h); Fp32 compiles to the kernel as it was before compact moments.
template <typename scalar_t, typename grad_t, Kind K, bool MOM, Reg R, Moments F>
int64_t run_chunk(const Work<opmath_t<scalar_t>>& w, const TensorWork<opmath_t<scalar_t>>& t, const MomentWork& mw,
                  int64_t b, int64_t e, opmath_t<scalar_t>* u, opmath_t<scalar_t>* factor, opmath_t<scalar_t>* row_f,
                  RowBuffersOf<F, R>& row_buffers) {
  using T = opmath_t<scalar_t>;
  scalar_t* theta = static_cast<scalar_t*>(t.theta);
  if constexpr (!is_row_reg(R)) {
    ThetaSink<scalar_t, R> sink{theta, t.hp, w.stream};
    sweep_any<scalar_t, grad_t, K, MOM, F>(t, mw, b, e, w.has_scale, w.scale, sink);
    return sink.total();
  } else {
    if constexpr (F == Moments::Int8) {
      // rows whose groups cannot end on 8-bit block boundaries: block-aligned pieces, θ in a
      // second pass (moment_rows.h)
      if (block_aligned_rows_per_group(t.n, mw.row_len, kScratch) == 0) {
        return run_rows_8bit<scalar_t, grad_t, K, MOM, R>(w, t, mw, b, e, kScratch, u, factor, row_f, row_buffers);
      }
    }
    const int64_t n = t.n;
    int64_t nnz = 0;
    if (n <= kScratch) {
      // [note: row maps in one pass] update a group of whole rows into the scratch buffer u (v, m,
      // s read and written once), reduce each row's Σu² from the cache-resident scratch, compute
      // the row factors a vector of rows at a time (a scalar sqrt + divide per row would dominate
      // short rows such as 3×3 kernels), broadcast them per element, then write θ in one vector sweep.
      int64_t rows_per_group = kScratch / n;
      if constexpr (F == Moments::Int8) rows_per_group = block_aligned_rows_per_group(n, mw.row_len, kScratch);
      for (int64_t gb = b; gb < e; gb += rows_per_group * n) {
        const int64_t ge = std::min(e, gb + rows_per_group * n);
        const int64_t rows = (ge - gb) / n;
        ScratchSink<scalar_t, R> sink{u, gb, t.hp};
        sweep_any<scalar_t, grad_t, K, MOM, F>(t, mw, gb, ge, w.has_scale, w.scale, sink);
        row_sums(u, rows, n, row_f);
        row_factors(row_f, rows, n, t.hp.thr_row);
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
          recompute_u<scalar_t, grad_t, K, R>(t, bb, be, w.has_scale, w.scale, u);
        } else {
          ScratchSink<scalar_t, R> sink{u, bb, t.hp};
          sweep_any<scalar_t, grad_t, K, MOM, F>(t, mw, bb, be, w.has_scale, w.scale, sink);
        }
        sum_sq += static_cast<double>(sum_squares(u, be - bb));
      }
      const T f = row_factor_thr(static_cast<T>(sum_sq), t.hp.thr_row);
      std::fill(factor, factor + kScratch, f);
      for (int64_t bb = b; bb < e; bb += kScratch) {
        const int64_t be = std::min(e, bb + kScratch);
        recompute_u<scalar_t, grad_t, K, R>(t, bb, be, w.has_scale, w.scale, u);
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

template <typename scalar_t, typename grad_t, Kind K, bool MOM, Reg R, Moments F>
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
    if constexpr (F == Moments::Int8) {
      // no 8-bit block split between chunks (moment_rows.h); kChunk is a multiple of a block
      for (int64_t b = 0, e = 0; b < t.numel; b = e) {
        e = chunk_end_8bit(b, step, t.numel, w.moments[ti].row_len, is_row_reg(R) ? t.n : 1);
        chunks.push_back({ti, b, e});
        starts.push_back(total);
        total += (e - b) + kChunkOverhead;
      }
      continue;
    }
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
    RowBuffersOf<F, R> row_buffers;
    for (; c < static_cast<int64_t>(chunks.size()) && starts[c] < hi; ++c) {
      const Chunk& ch = chunks[c];
      chunk_nnz[c] = run_chunk<scalar_t, grad_t, K, MOM, R, F>(w, w.tensors[ch.tensor], moment_work<F>(w, ch.tensor),
                                                                ch.begin, ch.end, scratch.data(), scratch.data() + kScratch,
                                                                scratch.data() + 2 * kScratch, row_buffers);
    }
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if (w.stream) _mm_sfence();  // order the non-temporal stores before the join
#endif
  });
  for (size_t c = 0; c < chunks.size(); ++c) counts[w.op_index[chunks[c].tensor]] += chunk_nnz[c];
}

template <typename scalar_t, typename grad_t, Kind K, bool MOM, Moments F = Moments::Fp32>
void dispatch_reg(const Work<opmath_t<scalar_t>>& w, int64_t* counts) {
  switch (w.hyper.reg) {
    case Reg::None: return run_all<scalar_t, grad_t, K, MOM, Reg::None, F>(w, counts);
    case Reg::L1: return run_all<scalar_t, grad_t, K, MOM, Reg::L1, F>(w, counts);
    case Reg::L1Pos: return run_all<scalar_t, grad_t, K, MOM, Reg::L1Pos, F>(w, counts);
    case Reg::Group: return run_all<scalar_t, grad_t, K, MOM, Reg::Group, F>(w, counts);
    case Reg::SparseGroup: return run_all<scalar_t, grad_t, K, MOM, Reg::SparseGroup, F>(w, counts);
  }
}

// The kinds with moments: one variant per moment format (float64 params only have fp32 moments,
// csrc/op_checks.h check_compact_moments).
template <typename scalar_t, typename grad_t, Kind K, bool MOM>
void dispatch_moments(const Work<opmath_t<scalar_t>>& w, int64_t* counts) {
  if constexpr (std::is_same_v<opmath_t<scalar_t>, float>) {
    switch (w.hyper.moments) {
      case Moments::Fp32: break;
      case Moments::Bf16: return dispatch_reg<scalar_t, grad_t, K, MOM, Moments::Bf16>(w, counts);
      case Moments::Int8: return dispatch_reg<scalar_t, grad_t, K, MOM, Moments::Int8>(w, counts);
    }
  }
  TORCH_INTERNAL_ASSERT(w.hyper.moments == Moments::Fp32, "compact moments of float64 params");
  return dispatch_reg<scalar_t, grad_t, K, MOM>(w, counts);
}

}  // namespace detail

template <typename scalar_t, typename grad_t>
void run_fused_step(const Work<opmath_t<scalar_t>>& w, int64_t* counts) {
  switch (w.hyper.kind) {
    case Kind::LinBreg:
      if (w.hyper.momentum) return detail::dispatch_moments<scalar_t, grad_t, Kind::LinBreg, true>(w, counts);
      return detail::dispatch_reg<scalar_t, grad_t, Kind::LinBreg, false>(w, counts);
    case Kind::AdaBreg:
      return detail::dispatch_moments<scalar_t, grad_t, Kind::AdaBreg, false>(w, counts);
    case Kind::ProxSGD:
      return detail::dispatch_reg<scalar_t, grad_t, Kind::ProxSGD, false>(w, counts);
  }
}

}  // namespace bregman::cpu
