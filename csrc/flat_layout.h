// Memory layouts the fused ops accept, shared by the CPU and CUDA boundary checks.
//
// The kernels walk every tensor as flat memory [data_ptr, data_ptr + numel). That is the logical
// element order of a contiguous tensor; for a param stored densely in another dim order (channels_last
// conv weights, a transposed weight) it is another order, but the same one for the param and each
// partner (grad, dual, moments) that has the param's strides: element k of each is the same
// coordinate, which is all the element-wise maps need (bregman_fused/backends/layout.py [note: dense views]).
// The row maps also need each group of n logical elements to be n consecutive elements in memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bregman {

// p can be walked as flat memory: contiguous, or dense (no gaps, no overlap) in another dim order.
inline bool is_flat(const at::Tensor& p) { return p.is_contiguous() || p.is_non_overlapping_and_dense(); }

// Partner t (same sizes as p, checked separately) is walked in p's flat order.
inline bool has_flat_order_of(const at::Tensor& t, const at::Tensor& p) {
  if (t.is_contiguous() && p.is_contiguous()) return true;
  return t.strides() == p.strides() && is_flat(t);
}

// Each group of n consecutive logical elements (a row of θ.flatten(k), a conv kernel) is one block
// of n consecutive elements in p's memory. For a dense p that holds when the trailing dims spanning
// a group are its innermost dims: each of them (of size > 1) has a stride below n, every other dim
// a stride of at least n. The regularizers' n is always such a trailing product (prod(shape[k:]));
// any other n is refused for a non-contiguous p, the safe side.
inline bool groups_are_blocks(const at::Tensor& p, int64_t n) {
  if (n <= 1 || p.numel() == 0 || p.is_contiguous()) return true;
  const auto sizes = p.sizes();
  const auto strides = p.strides();
  int64_t first_group_dim = p.dim();
  int64_t span = 1;
  while (first_group_dim > 0 && span < n) span *= sizes[--first_group_dim];
  if (span != n) return false;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (sizes[d] == 1) continue;
    const bool in_group = d >= first_group_dim;
    if (in_group != (strides[d] < n)) return false;
  }
  return true;
}

}  // namespace bregman
