// 8-bit moments (moments="8bit"; the spec: bregman_fused/backends/moments.py [note: 8-bit code], the
// per-element math: csrc/moment_codes.h) for AdaBreg and LinBreg with momentum.
//
// [note: 8-bit kernel] A moment block is kMomentBlock (256) consecutive elements of one dim-0 row (the
// last block of a row shorter), with one float scale per block in a (rows, blocks per row) tensor.
// Its codes can only be written once the block's NEW scale is known, the max over the block of the
// updated |m| (and √s), so the work is decomposed by (tensor, row, block) instead of flat chunks:
//  - one warp owns one block: lane l holds elements l, l + 32, ..., l + 224 (kPerLane = 8, coalesced
//    per step), decodes them with the block's old scale, runs the float update (update_point),
//    writes the dual (and, for the element-wise maps, θ from the new float values), keeps the new
//    m and r = √s in registers, reduces the NaN-propagating max over the warp (warp_max_abs), then
//    encodes with block_code(new scale) and writes the codes; lane 0 writes the new scales.
//  - a CTA of kThreads = 256 threads (8 warps) owns kBlocksPerCta consecutive blocks of one tensor,
//    counted row-major over (row, block of the row): the table's chunk c is blocks [c·64, c·64 + 64).
// Row regularizers (Group / SparseGroup) need the norm of a whole regularizer row, which need not
// be a dim-0 row: this kernel then writes no θ (WriteTheta = false) and row_group.cu's θ pass
// (Mom = Moments::Int8) follows on the same stream, reading the duals written here.
// found_inf set: nothing is written; the θ-writing variant counts the unchanged θ (the θ pass does
// that for row maps).
#include "compact_moments.cuh"
#include "device_memory.cuh"
#include "dispatch_step.cuh"
#include "fused_step_cuda.h"
#include "launch_args.cuh"
#include "multi_tensor_apply.cuh"
#include "reductions.cuh"

namespace bregman_cuda {
namespace {

using bregman::kMomentBlock;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = static_cast<int>(kMomentBlock) / 32;  // elements of a block per lane
constexpr int64_t kBlocksPerCta = 64;                          // 8 blocks per warp: 16 Ki elements
static_assert(kMomentBlock % 32 == 0, "a block is whole warps' worth of elements");

// Blocks per dim-0 row of `row_len` elements: ceil(row_len / 256) (scales.shape[1]).
__host__ __device__ __forceinline__ int64_t blocks_per_row(int64_t row_len) {
  return (row_len + kMomentBlock - 1) / kMomentBlock;
}

// At least 3 CTAs per SM (≤ 85 registers): unbounded, ptxas hoists all of a lane's 8 elements' loads
// and takes up to 168 registers for AdaBreg (1 CTA, 8 warps per SM); bounded, it spills nothing
// (-Xptxas -v, sm_90).
template <typename scalar_t, typename grad_t, Kind K, bool Momentum, bool WriteTheta>
__global__ void __launch_bounds__(kThreads, 3)
    moments_8bit_kernel(const __grid_constant__ StepTable<K, Momentum, Moments::Int8, float> meta,
                        const __grid_constant__ LaunchArgs<float> args) {
  constexpr bool kAda = K == Kind::AdaBreg;  // else LinBreg with momentum: m only, no s
  static_assert(kAda || (K == Kind::LinBreg && Momentum), "8-bit moments only for the kinds with moments");
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int32_t index = meta.tensor_index[slot];
  // tensors with no elements get no CTA (launch_moments_8bit), so row_len > 0 and rows > 0 here
  const int64_t row_len = meta.row_len[slot];
  const int64_t per_row = blocks_per_row(row_len);
  const int64_t nblocks = meta.numel[slot] / row_len * per_row;
  const int64_t first = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kBlocksPerCta;
  const int64_t last = first + kBlocksPerCta < nblocks ? first + kBlocksPerCta : nblocks;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;

  scalar_t* p = static_cast<scalar_t*>(meta.ptrs[kParam][slot]);
  const grad_t* g = static_cast<const grad_t*>(meta.ptrs[kGrad][slot]);
  float* v = static_cast<float*>(meta.ptrs[kDual][slot]);
  int8_t* m_codes = static_cast<int8_t*>(meta.ptrs[kExpAvg][slot]);
  float* m_scales = static_cast<float*>(meta.ptrs[kExpAvgScale][slot]);
  uint8_t* s_codes = nullptr;
  float* s_scales = nullptr;
  if constexpr (kAda) {
    s_codes = static_cast<uint8_t*>(meta.ptrs[kExpAvgSq][slot]);
    s_scales = static_cast<float*>(meta.ptrs[kExpAvgSqScale][slot]);
  }

  // Block q (int64, row-major over (row, block of the row)): its first element's offset in the tensor
  // (= in its memory: 8-bit tensors are contiguous) and its length (the last block of a row shorter).
  // q is uniform over a warp, so whole warps run each loop below and reach the shuffles together.
  auto block_extent = [&](int64_t q, int64_t& base, int& len) {
    const int64_t row = q / per_row;
    const int64_t col = (q - row * per_row) * kMomentBlock;  // within the row
    base = row * row_len + col;
    const int64_t rest = row_len - col;
    len = static_cast<int>(rest < kMomentBlock ? rest : kMomentBlock);
  };

  unsigned int nnz = 0;
  if (skip_step(args.found_inf)) {  // AMP overflow: change nothing
    if constexpr (WriteTheta) {     // and report the current θ's non-zeros
      for (int64_t q = first + warp; q < last; q += kWarps) {
        int64_t base;
        int len;
        block_extent(q, base, len);
        for (int j = lane; j < len; j += 32) nnz += is_nonzero(p[base + j]);
      }
      add_block_count(args.counts, index, nnz);
    }
    return;
  }

  const StepParams<float> hp = tensor_step_params(meta, args, slot);
  const Reg reg = args.hyper.reg;
  const bool scaled = args.grad_scale != nullptr;
  const float scale = scaled ? *args.grad_scale : 1.0f;

  for (int64_t q = first + warp; q < last; q += kWarps) {
    int64_t base;
    int len;
    block_extent(q, base, len);
    // decode with the block's old scales (every lane reads them; lane 0 overwrites them after the
    // __syncwarp below)
    const float m_step = bregman::block_code(m_scales[q], bregman::kQSigned).step;
    float s_step = 0.0f;
    if constexpr (kAda) s_step = bregman::block_code(s_scales[q], bregman::kQUnsigned).step;

    float m_new[kPerLane];
    float r_new[kPerLane];  // √s_new (AdaBreg), the value s is coded by
    float m_max = 0.0f;     // the padding of a short block is 0 in the reference: 0 is the identity
    float r_max = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int j = lane + 32 * k;
      m_new[k] = 0.0f;
      r_new[k] = 0.0f;
      if (j < len) {
        const int64_t e = base + j;
        float gi = static_cast<float>(g[e]);
        if (scaled) gi = unscale(gi, scale);
        float vi = v[e];
        float mi = bregman::decode_m(m_codes[e], m_step);
        float si = 0.0f;
        if constexpr (kAda) si = bregman::decode_s(s_codes[e], s_step);
        const float x = bregman::update_point<K, Momentum>(gi, 0.0f, vi, mi, si, hp);
        v[e] = vi;
        if constexpr (WriteTheta) {
          const scalar_t theta = static_cast<scalar_t>(bregman::elementwise_theta(reg, x, hp));
          p[e] = theta;
          nnz += is_nonzero(theta);
        }
        m_new[k] = mi;
        m_max = bregman::max_abs(m_max, mi);
        if constexpr (kAda) {
          r_new[k] = bregman::bf_sqrt(si);  // the reference's root = s.sqrt(), correctly rounded
          r_max = bregman::max_abs(r_max, r_new[k]);
        }
      }
    }
    // the new scales and their encode factors, the same on every lane
    m_max = warp_max_abs(m_max);
    const float m_inv = bregman::block_code(m_max, bregman::kQSigned).inv;
    float s_inv = 0.0f;
    if constexpr (kAda) {
      r_max = warp_max_abs(r_max);
      s_inv = bregman::block_code(r_max, bregman::kQUnsigned).inv;
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int j = lane + 32 * k;
      if (j < len) {
        m_codes[base + j] = bregman::encode_m(m_new[k], m_inv);
        if constexpr (kAda) s_codes[base + j] = bregman::encode_s(r_new[k], s_inv);
      }
    }
    __syncwarp();  // orders every lane's read of the old scales before lane 0's write
    if (lane == 0) {
      m_scales[q] = m_max;
      if constexpr (kAda) s_scales[q] = r_max;
    }
  }
  if constexpr (WriteTheta) add_block_count(args.counts, index, nnz);
}

}  // namespace

void launch_moments_8bit(const StepInputs& in) {
  const bool write_theta = !bregman::is_row_reg(in.hyper.reg);
  dispatch_compact_step<Moments::Int8>(in, [&](auto variant) {
    using V = decltype(variant);
    static_assert(std::is_same_v<typename V::opmath_t, float>);
    launch_step_tables<V>(
        in,
        [&](int64_t i) -> int64_t {
          const at::Tensor& p = in.tensors.params[i];
          const int64_t numel = p.numel();
          if (numel == 0) return 0;  // also rows = 0 and row_len = 0: no blocks, no scales
          const int64_t rows = p.size(0);  // dim >= 1: op_checks.h check_compact_moments
          return (rows * blocks_per_row(numel / rows) + kBlocksPerCta - 1) / kBlocksPerCta;
        },
        [&](const auto& meta, const auto& args, int nblocks, cudaStream_t stream) {
          using S = typename V::scalar_t;
          using G = typename V::grad_t;
          if (write_theta) {
            moments_8bit_kernel<S, G, V::kind, V::momentum, true><<<nblocks, kThreads, 0, stream>>>(meta, args);
          } else {
            moments_8bit_kernel<S, G, V::kind, V::momentum, false><<<nblocks, kThreads, 0, stream>>>(meta, args);
          }
        });
  });
}

}  // namespace bregman_cuda
