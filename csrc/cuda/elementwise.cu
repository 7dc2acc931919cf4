// Element-wise fused step (regularizers None / L1 / L1Pos) for LinBreg (± momentum), AdaBreg, ProxSGD.
//
// One block = one 64 Ki-element chunk of one tensor (see [note: multi-tensor apply]). Each thread
// reads g (θ for ProxSGD) and the states, calls the bregman_math.h formulas in opmath_t, writes the
// states and θ, and counts θ's non-zeros; the block adds its count with one atomicAdd.
// The regularizer is a run-time switch (dispatch_step.cuh says why).
// Mom: how m and s are stored, fp32 or bf16 (compact_moments.cuh; 8-bit moments: moments_8bit.cu).
#include "compact_moments.cuh"
#include "device_memory.cuh"
#include "dispatch_step.cuh"
#include "fused_step_cuda.h"
#include "launch_args.cuh"
#include "multi_tensor_apply.cuh"
#include "reductions.cuh"

namespace bregman_cuda {
namespace {

constexpr int kBlock = 512;
constexpr int kILP = 4;  // elements per vector access: 16 B for the fp32 states
constexpr int64_t kChunk = 65536;

template <typename scalar_t, typename grad_t, typename opmath_t, Kind K, bool Momentum, Moments Mom>
__global__ void __launch_bounds__(kBlock)
    elementwise_kernel(const __grid_constant__ StepTable<K, Momentum, Mom, opmath_t> meta,
                       const __grid_constant__ LaunchArgs<opmath_t> args) {
  static_assert(Mom != Moments::Int8, "8-bit moments: moments_8bit.cu");
  constexpr int Depth = list_depth(K, Momentum);
  using Codec = MomentCodec<Mom, opmath_t>;
  using moment_t = typename Codec::stored_t;
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t remaining = meta.numel[slot] - start;
  const int64_t len = remaining < kChunk ? remaining : kChunk;
  const int32_t index = meta.tensor_index[slot];

  scalar_t* p = static_cast<scalar_t*>(meta.ptrs[kParam][slot]) + start;
  const grad_t* g = static_cast<const grad_t*>(meta.ptrs[kGrad][slot]) + start;
  opmath_t* v = nullptr;
  moment_t* m = nullptr;
  moment_t* s = nullptr;
  if constexpr (Depth >= 3) v = static_cast<opmath_t*>(meta.ptrs[kDual][slot]) + start;
  if constexpr (Depth >= 4) m = static_cast<moment_t*>(meta.ptrs[kExpAvg][slot]) + start;
  if constexpr (Depth >= 5) s = static_cast<moment_t*>(meta.ptrs[kExpAvgSq][slot]) + start;

  unsigned int nnz = 0;
  if (skip_step(args.found_inf)) {  // AMP overflow: change nothing, report the current θ's non-zeros
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) nnz += is_nonzero(p[i]);
    add_block_count(args.counts, index, nnz);
    return;
  }

  const StepParams<opmath_t> hp = tensor_step_params(meta, args, slot);
  const Reg reg = args.hyper.reg;
  const bool scaled = args.grad_scale != nullptr;
  const opmath_t scale = scaled ? static_cast<opmath_t>(*args.grad_scale) : opmath_t(1);
  uint32_t step = 0;  // bf16: the step count of the random bits
  if constexpr (Mom == Moments::Bf16) step = sr_step(meta, args, slot);

  // the per-element step, shared by the vector body and the scalar tail
  auto theta_of = [&](grad_t g_in, opmath_t theta_old, opmath_t& vi, opmath_t& mi, opmath_t& si) -> scalar_t {
    opmath_t gi = static_cast<opmath_t>(g_in);
    if (scaled) gi = unscale(gi, scale);
    const opmath_t x = bregman::update_point<K, Momentum>(gi, theta_old, vi, mi, si, hp);
    const scalar_t theta = static_cast<scalar_t>(bregman::elementwise_theta(reg, x, hp));
    nnz += is_nonzero(theta);
    return theta;
  };

  bool aligned = is_aligned<kILP>(p) && is_aligned<kILP>(g);
  if constexpr (Depth >= 3) aligned = aligned && is_aligned<kILP>(v);
  if constexpr (Depth >= 4) aligned = aligned && is_aligned<kILP>(m);
  if constexpr (Depth >= 5) aligned = aligned && is_aligned<kILP>(s);
  const int64_t vec_end = aligned ? (len / kILP) * kILP : 0;

  const int64_t stride = static_cast<int64_t>(blockDim.x) * kILP;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kILP; i < vec_end; i += stride) {
    scalar_t pr[kILP];
    grad_t gr[kILP];
    opmath_t vr[kILP] = {};
    opmath_t mr[kILP] = {};
    opmath_t sr[kILP] = {};
    load_vec(gr, g, i);
    if constexpr (K == Kind::ProxSGD) load_vec(pr, p, i);
    if constexpr (Depth >= 3) load_vec(vr, v, i);
    if constexpr (Depth >= 4) load_moments<Mom>(mr, m, i);
    if constexpr (Depth >= 5) load_moments<Mom>(sr, s, i);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      opmath_t theta_old = opmath_t(0);
      if constexpr (K == Kind::ProxSGD) theta_old = static_cast<opmath_t>(pr[k]);
      pr[k] = theta_of(gr[k], theta_old, vr[k], mr[k], sr[k]);
    }
    if constexpr (Depth >= 3) store_vec(v, i, vr);
    if constexpr (Depth >= 4) store_moments<Mom>(m, i, mr, step, bregman::kStreamM);
    if constexpr (Depth >= 5) store_moments<Mom>(s, i, sr, step, bregman::kStreamS);
    store_vec(p, i, pr);
  }
  // masked scalar path: the tail of an aligned chunk, or the whole chunk of a misaligned tensor
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    opmath_t vi = opmath_t(0), mi = opmath_t(0), si = opmath_t(0);
    opmath_t theta_old = opmath_t(0);
    if constexpr (K == Kind::ProxSGD) theta_old = static_cast<opmath_t>(p[i]);
    if constexpr (Depth >= 3) vi = v[i];
    if constexpr (Depth >= 4) mi = Codec::decode(m[i]);
    if constexpr (Depth >= 5) si = Codec::decode(s[i]);
    const scalar_t theta = theta_of(g[i], theta_old, vi, mi, si);
    if constexpr (Depth >= 3) v[i] = vi;
    if constexpr (Depth >= 4) m[i] = Codec::encode(mi, step, bregman::kStreamM);
    if constexpr (Depth >= 5) s[i] = Codec::encode(si, step, bregman::kStreamS);
    p[i] = theta;
  }
  add_block_count(args.counts, index, nnz);
}

}  // namespace

void launch_elementwise(const StepInputs& in) {
  auto launch = [&](auto variant) {
    using V = decltype(variant);
    launch_step_tables<V>(
        in, [&](int64_t i) { return (in.tensors.params[i].numel() + kChunk - 1) / kChunk; },
        [&](const auto& meta, const auto& args, int nblocks, cudaStream_t stream) {
          elementwise_kernel<typename V::scalar_t, typename V::grad_t, typename V::opmath_t, V::kind, V::momentum,
                             V::moments><<<nblocks, kBlock, 0, stream>>>(meta, args);
        });
  };
  switch (in.hyper.moments) {
    case Moments::Fp32: return dispatch_step(in, launch);
    case Moments::Bf16: return dispatch_compact_step<Moments::Bf16>(in, launch);
    case Moments::Int8: break;
  }
  TORCH_CHECK(false, "bregman_fused: 8-bit moments are stepped by launch_moments_8bit");
}

}  // namespace bregman_cuda
