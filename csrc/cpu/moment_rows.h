// 8-bit moments in the CPU kernel's work split and in the row maps.
//
// An 8-bit block (kMomentBlock elements of a dim-0 row, csrc/moment_codes.h) is encoded from the
// new values of all its elements at once, so no block may be split: not between chunks (threads),
// not between the pieces a row map updates into its scratch buffer. Chunks of 8-bit tensors end
// on block boundaries (chunk_end_8bit). The row maps update whole groups of rows into a scratch
// buffer; where groups of whole dim-0 rows are whole map rows and fit the buffer, run_chunk's
// one-pass path does it (block_aligned_rows_per_group). Otherwise the map rows (n elements) do not
// line up with the blocks (n > kScratch, or n neither a multiple nor a divisor of the row length),
// and run_rows_8bit updates block-aligned pieces, sums each row's Σu² across pieces, and writes θ
// in a second pass that recomputes u from the updated dual (like run_chunk's path for long rows).
#pragma once

#include "simd_memory.h"  // first: see there

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "bregman_math.h"
#include "moment_codes.h"
#include "moment_sweep.h"
#include "row_maps.h"
#include "work.h"

namespace bregman::cpu::detail {

// Whether element offset p starts a block (or is the tensor's end) in rows of row_len elements.
inline bool is_block_boundary(int64_t p, int64_t row_len) { return (p % row_len) % kMomentBlock == 0; }

// The last block boundary at or before p.
inline int64_t block_floor(int64_t p, int64_t row_len) {
  const int64_t row_start = p - p % row_len;
  return row_start + (p - row_start) / kMomentBlock * kMomentBlock;
}

// The end of the chunk of an 8-bit tensor that starts at (a valid boundary) b and holds about len
// elements: the first offset at or after b + len that is a block boundary and, for the row maps,
// a row boundary (a multiple of n; n = 1 for the element-wise maps), or numel.
inline int64_t chunk_end_8bit(int64_t b, int64_t len, int64_t numel, int64_t row_len, int64_t n) {
  int64_t p = b + std::max<int64_t>(len, 1);
  if (p >= numel) return numel;
  if (n == 1) {  // the next block boundary, directly
    const int64_t f = block_floor(p, row_len);
    if (f == p) return p;
    return std::min({f + kMomentBlock, p - p % row_len + row_len, numel});
  }
  p = (p + n - 1) / n * n;
  while (p < numel && !is_block_boundary(p, row_len)) p += n;  // at most a few rows in practice
  return std::min(p, numel);
}

// The rows per scratch group of run_chunk's one-pass row maps (kernel.h) for a tensor with 8-bit
// moments, such that every group (from a chunk start, which is a block boundary) ends on a block
// boundary: groups of whole dim-0 rows, which hold whole blocks. That works when a map row is whole
// dim-0 rows (GroupL1L2: n = row_len) or a dim-0 row is whole map rows (KernelL1L2: n = kh·kw) that
// fit the scratch buffer; 0 otherwise (run_rows_8bit's two passes).
inline int64_t block_aligned_rows_per_group(int64_t n, int64_t row_len, int64_t scratch) {
  if (n > scratch) return 0;
  if (n % row_len == 0) return scratch / n;
  if (row_len % n == 0 && row_len <= scratch) return scratch / row_len * (row_len / n);
  return 0;
}

// sums[r] += Σu² of the part of row r in a piece: u holds the chunk's elements [off, off + len),
// rows of n elements from the chunk's start; tmp: scratch for the whole rows' sums. Rows of one
// element are always whole: their sums are |u|, as row_sums gives them and row_factors takes them.
template <typename T>
void add_row_sums(const T* u, int64_t off, int64_t len, int64_t n, double* sums, T* tmp) {
  int64_t r = off / n;
  int64_t j = 0;
  if (off % n != 0) {  // the end of a row begun in an earlier piece
    j = std::min(len, n - off % n);
    sums[r] += static_cast<double>(sum_squares(u, j));
    if ((off + j) % n == 0) ++r;
  }
  const int64_t whole = (len - j) / n;
  if (whole > 0) {  // as the one-pass row maps reduce them: bit-identical row sums for these rows
    row_sums(u + j, whole, n, tmp);
    for (int64_t k = 0; k < whole; ++k) sums[r + k] += static_cast<double>(tmp[k]);
    j += whole * n;
    r += whole;
  }
  if (j < len) sums[r] += static_cast<double>(sum_squares(u + j, len - j));
}

// The row factor of each element of the chunk's [off, off + len): f (one per row) itself for
// rows of one element, else written to out.
template <typename T>
const T* element_factors(const T* f, int64_t off, int64_t len, int64_t n, T* out) {
  if (n == 1) return f + off;
  int64_t r = off / n;
  int64_t j = 0;
  if (off % n != 0) {
    j = std::min(len, n - off % n);
    std::fill(out, out + j, f[r]);
    if ((off + j) % n == 0) ++r;
  }
  const int64_t whole = (len - j) / n;
  if (whole > 0) {
    broadcast_rows(f + r, whole, n, out + j);
    j += whole * n;
    r += whole;
  }
  if (j < len) std::fill(out + j, out + len, f[r]);
  return out;
}

// Per-thread buffers of run_rows_8bit (one chunk's rows); nothing for the other variants.
struct RowBuffers {
  std::vector<double> sums;
  std::vector<float> factors;
};
struct NoRowBuffers {};
template <Moments F, Reg R>
using RowBuffersOf = std::conditional_t<F == Moments::Int8 && is_row_reg(R), RowBuffers, NoRowBuffers>;

// A row-map chunk [b, e) (whole rows, block boundaries at both ends) of a tensor with 8-bit
// moments; returns the non-zeros written. u, factor, row_f: `scratch` floats each.
template <typename scalar_t, typename grad_t, Kind K, bool MOM, Reg R>
int64_t run_rows_8bit(const Work<float>& w, const TensorWork<float>& t, const MomentWork& mw, int64_t b, int64_t e,
                      int64_t scratch, float* u, float* factor, float* row_f, RowBuffers& buf) {
  static_assert(is_row_reg(R) && K != Kind::ProxSGD, "the Bregman row maps");
  const int64_t n = t.n;
  const int64_t rows = (e - b) / n;
  buf.sums.assign(static_cast<size_t>(rows), 0.0);
  // pass 1: the states, in pieces of whole blocks that fit the scratch buffer; Σu² per row
  for (int64_t pb = b; pb < e;) {
    const int64_t pe = block_floor(std::min(e, pb + scratch), mw.row_len);
    ScratchSink<scalar_t, R> sink{u, pb, t.hp};
    sweep_8bit<scalar_t, grad_t, K, MOM>(t, mw, pb, pe, w.has_scale, w.scale, sink);
    add_row_sums(u, pb - b, pe - pb, n, buf.sums.data(), row_f);
    pb = pe;
  }
  buf.factors.resize(static_cast<size_t>(rows));
  float* f = buf.factors.data();
  for (int64_t r = 0; r < rows; ++r) f[r] = static_cast<float>(buf.sums[r]);
  row_factors(f, rows, n, t.hp.thr_row);
  // pass 2: θ = (u·factor)·δ, u recomputed from the updated dual
  scalar_t* theta = static_cast<scalar_t*>(t.theta);
  int64_t nnz = 0;
  for (int64_t qb = b; qb < e; qb += scratch) {
    const int64_t qe = std::min(e, qb + scratch);
    recompute_u<scalar_t, grad_t, K, R>(t, qb, qe, w.has_scale, w.scale, u);
    const float* fac = element_factors(f, qb - b, qe - qb, n, factor);
    nnz += write_rows<scalar_t>(theta, qb, qe - qb, u, fac, t.hp, w.stream);
  }
  return nnz;
}

}  // namespace bregman::cpu::detail
