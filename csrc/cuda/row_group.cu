// Row-group fused step (regularizers Group / SparseGroup) for LinBreg (± momentum), AdaBreg, ProxSGD.
//
// [note: row kernel] A row-regularized tensor is numel/n rows, each a block of n consecutive elements
// in memory (csrc/flat_layout.h; contiguous, or a dense layout that keeps groups whole). θ_r needs the
// norm of the row's UPDATED dual (after the L1 soft-threshold for SparseGroup), so whoever updates a
// row must also own all of it:
//  - short rows (n ≤ 32·kRowK): a group of G lanes (G a power of two ≤ 32, the smallest with
//    G·kRowK ≥ n) owns one row; a block holds 256/G rows. Each lane updates its ≤ kRowK elements,
//    keeps u in registers, the group reduces Σu² with shuffles, then writes θ.
//  - medium rows (n ≤ 256·kRowK): one block per row, u in registers, block reduction, write.
//  - long rows: one block per row in two sweeps: sweep 1 updates the states and sums u²; sweep 2
//    re-derives u from the stored dual (ProxSGD: from the untouched θ and g, θ is only written in
//    sweep 2, by the same thread that read it) and writes θ. Only these rows read memory twice.
// The table's "chunks" are groups of rows: chunk c of a tensor is rows [c·rows_per_block, ...).
//
// Mom, how m and s are stored (compact_moments.cuh): Fp32 and Bf16 update them here, element by
// element. Int8: moments_8bit.cu has already updated the duals and moments (an 8-bit block follows
// dim-0 rows, which need not be the regularizer's rows); this kernel is then the θ pass alone: u is
// taken from the stored dual, as in sweep 2 above (for AdaBreg and LinBreg with momentum, the kinds
// with moments, the point x of the map is the updated dual itself), and g, m, s are not read.
#include "compact_moments.cuh"
#include "device_memory.cuh"
#include "dispatch_step.cuh"
#include "fused_step_cuda.h"
#include "launch_args.cuh"
#include "multi_tensor_apply.cuh"
#include "reductions.cuh"

namespace bregman_cuda {
namespace {

constexpr int kRowBlock = 256;
constexpr int kRowK = 8;  // elements per thread held in registers in the one-sweep modes

struct RowPlan {
  int group;           // lanes per row; kRowBlock = the whole block
  int rows_per_block;  // rows one block owns
  bool two_pass;       // row too long for registers
};

// The same plan on the host (how many blocks) and in the kernel (which rows).
__host__ __device__ __forceinline__ RowPlan row_plan(int64_t n) {
  if (n <= 32 * kRowK) {
    const int need = static_cast<int>((n + kRowK - 1) / kRowK);
    int g = 1;
    while (g < need) g *= 2;
    return {g, kRowBlock / g, false};
  }
  return {kRowBlock, 1, n > static_cast<int64_t>(kRowBlock) * kRowK};
}

template <typename scalar_t, typename grad_t, typename opmath_t, Kind K, bool Momentum, Moments Mom>
__global__ void __launch_bounds__(kRowBlock)
    row_group_kernel(const __grid_constant__ StepTable<K, Momentum, Mom, opmath_t> meta,
                     const __grid_constant__ LaunchArgs<opmath_t> args) {
  constexpr int Depth = list_depth(K, Momentum);
  constexpr bool kFromDual = Mom == Moments::Int8;  // the θ pass after moments_8bit.cu
  static_assert(!kFromDual || K == Kind::AdaBreg || Momentum, "8-bit moments only for the kinds with moments");
  using Codec = MomentCodec<kFromDual ? Moments::Fp32 : Mom, opmath_t>;  // Int8: m and s are not touched
  using moment_t = typename Codec::stored_t;
  __shared__ opmath_t scratch[kRowBlock / 32];

  const int slot = meta.block_to_tensor[blockIdx.x];
  const int32_t index = meta.tensor_index[slot];
  const int64_t n = meta.group_size[slot];
  const int64_t rows = meta.numel[slot] / n;
  const RowPlan plan = row_plan(n);
  const int64_t first_row = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * plan.rows_per_block;

  scalar_t* p = static_cast<scalar_t*>(meta.ptrs[kParam][slot]);
  const grad_t* g = static_cast<const grad_t*>(meta.ptrs[kGrad][slot]);
  opmath_t* v = nullptr;
  moment_t* m = nullptr;
  moment_t* s = nullptr;
  if constexpr (Depth >= 3) v = static_cast<opmath_t*>(meta.ptrs[kDual][slot]);
  if constexpr (Depth >= 4 && !kFromDual) m = static_cast<moment_t*>(meta.ptrs[kExpAvg][slot]);
  if constexpr (Depth >= 5 && !kFromDual) s = static_cast<moment_t*>(meta.ptrs[kExpAvgSq][slot]);

  unsigned int nnz = 0;
  if (skip_step(args.found_inf)) {  // AMP overflow: change nothing, report the current θ's non-zeros
    const int64_t last_row = first_row + plan.rows_per_block < rows ? first_row + plan.rows_per_block : rows;
    for (int64_t e = first_row * n + threadIdx.x; e < last_row * n; e += blockDim.x) nnz += is_nonzero(p[e]);
    add_block_count(args.counts, index, nnz);
    return;
  }

  // hp.thr_row: λ₂·√n (·τ), rounded once from double, as in the CPU backend
  const StepParams<opmath_t> hp = tensor_step_params(meta, args, slot);
  const Reg reg = args.hyper.reg;
  const bool scaled = args.grad_scale != nullptr;
  const opmath_t scale = scaled ? static_cast<opmath_t>(*args.grad_scale) : opmath_t(1);
  uint32_t step = 0;  // bf16: the step count of the random bits
  if constexpr (Mom == Moments::Bf16) step = sr_step(meta, args, slot);

  auto grad_at = [&](int64_t e) -> opmath_t {
    const opmath_t gi = static_cast<opmath_t>(g[e]);
    return scaled ? unscale(gi, scale) : gi;
  };
  // Update element e's states; return u = the element-wise part of the map (identity for Group).
  auto update = [&](int64_t e) -> opmath_t {
    if constexpr (kFromDual) {
      return bregman::elementwise_shrink(reg, v[e], hp);  // updated by moments_8bit.cu
    } else {
      opmath_t vi = opmath_t(0), mi = opmath_t(0), si = opmath_t(0);
      opmath_t theta_old = opmath_t(0);
      if constexpr (K == Kind::ProxSGD) theta_old = static_cast<opmath_t>(p[e]);
      if constexpr (Depth >= 3) vi = v[e];
      if constexpr (Depth >= 4) mi = Codec::decode(m[e]);
      if constexpr (Depth >= 5) si = Codec::decode(s[e]);
      const opmath_t x = bregman::update_point<K, Momentum>(grad_at(e), theta_old, vi, mi, si, hp);
      if constexpr (Depth >= 3) v[e] = vi;
      if constexpr (Depth >= 4) m[e] = Codec::encode(mi, step, bregman::kStreamM);
      if constexpr (Depth >= 5) s[e] = Codec::encode(si, step, bregman::kStreamS);
      return bregman::elementwise_shrink(reg, x, hp);
    }
  };
  // Sweep 2 of long rows: the same u again, from what sweep 1 left in memory.
  auto recompute = [&](int64_t e) -> opmath_t {
    opmath_t x;
    if constexpr (K == Kind::ProxSGD) {
      x = bregman::proxsgd_point(static_cast<opmath_t>(p[e]), grad_at(e), hp);
    } else {
      x = v[e];  // the update functions return the updated dual itself
    }
    return bregman::elementwise_shrink(reg, x, hp);
  };
  // θ = (u · row factor) · δ, the reference's order
  auto write = [&](int64_t e, opmath_t u, opmath_t factor) {
    const scalar_t theta = static_cast<scalar_t>(bregman::row_theta(u, factor, hp));
    p[e] = theta;
    nnz += is_nonzero(theta);
  };

  if (plan.group < kRowBlock) {
    // sub-warp groups: every lane reaches the shuffles, rows past the end contribute nothing
    const int G = plan.group;
    const int lane = static_cast<int>(threadIdx.x) % G;
    const int64_t row = first_row + threadIdx.x / G;
    const bool active = row < rows;
    const int64_t base = row * n;
    opmath_t u[kRowK];
    opmath_t sum_sq = opmath_t(0);
#pragma unroll
    for (int k = 0; k < kRowK; ++k) {
      const int64_t j = lane + static_cast<int64_t>(k) * G;
      u[k] = opmath_t(0);
      if (active && j < n) {
        u[k] = update(base + j);
        sum_sq += u[k] * u[k];
      }
    }
    sum_sq = warp_sum(sum_sq, G);
    // a row of one element has the norm |u| (bregman_math.h [note: one-element rows])
    const opmath_t factor = n == 1 ? bregman::row_factor_norm(u[0] < opmath_t(0) ? -u[0] : u[0], hp.thr_row)
                                   : bregman::row_factor_thr(sum_sq, hp.thr_row);
#pragma unroll
    for (int k = 0; k < kRowK; ++k) {
      const int64_t j = lane + static_cast<int64_t>(k) * G;
      if (active && j < n) write(base + j, u[k], factor);
    }
  } else if (!plan.two_pass) {
    // one row per block, held in registers
    const int64_t base = first_row * n;
    opmath_t u[kRowK];
    opmath_t sum_sq = opmath_t(0);
#pragma unroll
    for (int k = 0; k < kRowK; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * kRowBlock;
      u[k] = opmath_t(0);
      if (j < n) {
        u[k] = update(base + j);
        sum_sq += u[k] * u[k];
      }
    }
    sum_sq = block_sum(sum_sq, scratch);
    const opmath_t factor = bregman::row_factor_thr(sum_sq, hp.thr_row);
#pragma unroll
    for (int k = 0; k < kRowK; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * kRowBlock;
      if (j < n) write(base + j, u[k], factor);
    }
  } else {
    // a row too long for registers: two sweeps, each element handled by the same thread in both
    const int64_t base = first_row * n;
    opmath_t sum_sq = opmath_t(0);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const opmath_t u = update(base + j);
      sum_sq += u * u;
    }
    sum_sq = block_sum(sum_sq, scratch);
    const opmath_t factor = bregman::row_factor_thr(sum_sq, hp.thr_row);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) write(base + j, recompute(base + j), factor);
  }
  add_block_count(args.counts, index, nnz);
}

}  // namespace

void launch_row_group(const StepInputs& in) {
  auto launch = [&](auto variant) {
    using V = decltype(variant);
    // the θ pass of 8-bit moments reads no grad: one kernel per param dtype (grad_t = scalar_t), the
    // same table type (StepTable does not depend on the grad dtype)
    using grad_t = std::conditional_t<V::moments == Moments::Int8, typename V::scalar_t, typename V::grad_t>;
    launch_step_tables<V>(
        in,
        [&](int64_t i) -> int64_t {
          const int64_t numel = in.tensors.params[i].numel();
          if (numel == 0) return 0;
          const int64_t n = in.tensors.group_sizes[i];
          const RowPlan plan = row_plan(n);
          return (numel / n + plan.rows_per_block - 1) / plan.rows_per_block;
        },
        [&](const auto& meta, const auto& args, int nblocks, cudaStream_t stream) {
          row_group_kernel<typename V::scalar_t, grad_t, typename V::opmath_t, V::kind, V::momentum, V::moments>
              <<<nblocks, kRowBlock, 0, stream>>>(meta, args);
        });
  };
  switch (in.hyper.moments) {
    case Moments::Fp32: return dispatch_step(in, launch);
    case Moments::Bf16: return dispatch_compact_step<Moments::Bf16>(in, launch);
    case Moments::Int8: return dispatch_compact_step<Moments::Int8>(in, launch);  // after launch_moments_8bit
  }
}

}  // namespace bregman_cuda
