// Element-wise fused step (regularizers None / L1 / L1Pos) for LinBreg (± momentum), AdaBreg, ProxSGD.
//
// One block = one 64 Ki-element chunk of one tensor (see [note: multi-tensor apply]). Each thread
// reads g (θ for ProxSGD) and the states, calls the bregman_math.h formulas in opmath_t, writes the
// states and θ, and counts θ's non-zeros; the block adds its count with one atomicAdd.
// The regularizer is a runtime switch (uniform per launch; it costs nothing next to the memory
// traffic and keeps the number of kernel instantiations — and the compile time — down).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "fused_step_cuda.h"
#include "multi_tensor_apply.cuh"

namespace bregman_cuda {
namespace {

constexpr int kBlock = 512;
constexpr int kILP = 4;  // elements per vector access: 16 B for the fp32 states
constexpr int64_t kChunk = 65536;

template <typename scalar_t, typename opmath_t, Kind K, bool Momentum>
__global__ void __launch_bounds__(kBlock)
    elementwise_kernel(const __grid_constant__ TensorListMeta<list_depth(K, Momentum), opmath_t> meta,
                       const __grid_constant__ Hyper<opmath_t> h) {
  constexpr int Depth = list_depth(K, Momentum);
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t remaining = meta.numel[slot] - start;
  const int64_t len = remaining < kChunk ? remaining : kChunk;
  const int32_t index = meta.tensor_index[slot];

  scalar_t* p = static_cast<scalar_t*>(meta.ptrs[kParam][slot]) + start;
  const scalar_t* g = static_cast<const scalar_t*>(meta.ptrs[kGrad][slot]) + start;
  opmath_t* v = nullptr;
  opmath_t* m = nullptr;
  opmath_t* s = nullptr;
  if constexpr (Depth >= 3) v = static_cast<opmath_t*>(meta.ptrs[kDual][slot]) + start;
  if constexpr (Depth >= 4) m = static_cast<opmath_t*>(meta.ptrs[kExpAvg][slot]) + start;
  if constexpr (Depth >= 5) s = static_cast<opmath_t*>(meta.ptrs[kExpAvgSq][slot]) + start;

  unsigned int nnz = 0;
  if (skip_step(h.found_inf)) {  // AMP overflow: change nothing, report the current θ's non-zeros
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) nnz += is_nonzero(p[i]);
    add_block_count(h.counts, index, nnz);
    return;
  }

  const StepParams<opmath_t> hp = tensor_step_params(meta, h, slot);
  const Reg reg = h.reg;
  const bool scaled = h.grad_scale != nullptr;
  const opmath_t scale = scaled ? static_cast<opmath_t>(*h.grad_scale) : opmath_t(1);

  // the per-element step, shared by the vector body and the scalar tail
  auto theta_of = [&](scalar_t g_in, opmath_t theta_old, opmath_t& vi, opmath_t& mi, opmath_t& si) -> scalar_t {
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
    scalar_t gr[kILP];
    opmath_t vr[kILP] = {};
    opmath_t mr[kILP] = {};
    opmath_t sr[kILP] = {};
    load_vec(gr, g, i);
    if constexpr (K == Kind::ProxSGD) load_vec(pr, p, i);
    if constexpr (Depth >= 3) load_vec(vr, v, i);
    if constexpr (Depth >= 4) load_vec(mr, m, i);
    if constexpr (Depth >= 5) load_vec(sr, s, i);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      opmath_t theta_old = opmath_t(0);
      if constexpr (K == Kind::ProxSGD) theta_old = static_cast<opmath_t>(pr[k]);
      pr[k] = theta_of(gr[k], theta_old, vr[k], mr[k], sr[k]);
    }
    if constexpr (Depth >= 3) store_vec(v, i, vr);
    if constexpr (Depth >= 4) store_vec(m, i, mr);
    if constexpr (Depth >= 5) store_vec(s, i, sr);
    store_vec(p, i, pr);
  }
  // masked scalar path: the tail of an aligned chunk, or the whole chunk of a misaligned tensor
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    opmath_t vi = opmath_t(0), mi = opmath_t(0), si = opmath_t(0);
    opmath_t theta_old = opmath_t(0);
    if constexpr (K == Kind::ProxSGD) theta_old = static_cast<opmath_t>(p[i]);
    if constexpr (Depth >= 3) vi = v[i];
    if constexpr (Depth >= 4) mi = m[i];
    if constexpr (Depth >= 5) si = s[i];
    const scalar_t theta = theta_of(g[i], theta_old, vi, mi, si);
    if constexpr (Depth >= 3) v[i] = vi;
    if constexpr (Depth >= 4) m[i] = mi;
    if constexpr (Depth >= 5) s[i] = si;
    p[i] = theta;
  }
  add_block_count(h.counts, index, nnz);
}

template <typename scalar_t, Kind K, bool Momentum>
void launch_typed(const StepInputs& in) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int Depth = list_depth(K, Momentum);
  using Meta = TensorListMeta<Depth, opmath_t>;
  const Hyper<opmath_t> hyper = make_hyper<opmath_t>(in);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  multi_tensor_apply<Meta>(
      static_cast<int64_t>(in.params.size()),
      [&](Meta& meta, int slot, int64_t i) { fill_slot<Depth, scalar_t>(meta, slot, i, in); },
      [&](int64_t i) { return (in.params[i].numel() + kChunk - 1) / kChunk; },
      [&](const Meta& meta, int nblocks) {
        elementwise_kernel<scalar_t, opmath_t, K, Momentum><<<nblocks, kBlock, 0, stream>>>(meta, hyper);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

void launch_elementwise(const StepInputs& in) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.params[0].scalar_type(), "bregman_fused_elementwise",
                                  [&] {
                                    switch (in.kind) {
                                      case Kind::LinBreg:
                                        if (in.momentum) {
                                          launch_typed<scalar_t, Kind::LinBreg, true>(in);
                                        } else {
                                          launch_typed<scalar_t, Kind::LinBreg, false>(in);
                                        }
                                        break;
                                      case Kind::AdaBreg:
                                        launch_typed<scalar_t, Kind::AdaBreg, false>(in);
                                        break;
                                      case Kind::ProxSGD:
                                        launch_typed<scalar_t, Kind::ProxSGD, false>(in);
                                        break;
                                    }
                                  });
}

}  // namespace bregman_cuda
