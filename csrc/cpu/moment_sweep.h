// The update sweep of compact moments (moments="bf16" | "8bit"): sweep.h's walk with the moments
// read and written through a policy, and the 8-bit walk block by block.
//
// A step decodes the stored moments to float, runs the float update (bregman_math.h's
// update_point, the fp32 sweep's; it rounds as the spec does, so the values encoded are the
// reference's bits), hands the point x to the same sinks as the fp32 sweep, and encodes the new m
// and s (the spec: bregman_fused/backends/moments.py). The fp32 sweep (sweep.h) is left as it is,
// so fp32 moments compile to the same code as before; sweep_any picks the walk at compile time.
#pragma once

#include "simd_memory.h"  // first: see there

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "bregman_math.h"
#include "moment_codes.h"
#include "moment_memory.h"
#include "sweep.h"
#include "work.h"

namespace bregman::cpu::detail {

// ---- the walk -------------------------------------------------------------------------------
// sweep() of sweep.h for the Bregman kinds with moments (v always there), with the moments loaded
// and stored through `io`: load(i, m0, m1, s0, s1) / store(...) for elements [i, i + kMomStep),
// load1(i, m, s) / store1(i, m, s) for one. A MomentIO without s leaves s0, s1 untouched.
template <typename scalar_t, typename grad_t, Kind K, bool MOM, typename MomentIO, typename Sink>
inline void sweep_io(const TensorWork<float>& t, int64_t b, int64_t e, bool has_scale, float scale, MomentIO& io,
                     Sink& sink) {
  static_assert(K == Kind::AdaBreg || (K == Kind::LinBreg && MOM), "compact moments: kinds with moments only");
  using M = Mem<scalar_t>;
  using G = GradMem<scalar_t, grad_t>;
  static_assert(M::kStep == kMomStep, "the float kernel's vector step is the moments' one");
  constexpr int64_t kVec = M::kVec;
  // a copy: stores through v (float*) could alias t.hp's floats, which kept the compiler from
  // holding the constants in registers across the loop
  const StepParams<float> hp = t.hp;
  const grad_t* grad = static_cast<const grad_t*>(t.grad);
  float* v = t.v;

  auto one = [&](int64_t i) {
    float g = G::load1(grad + i);
    if (has_scale) g = g / scale;
    float vv = v[i], mm = 0.0f, ss = 0.0f;
    io.load1(i, mm, ss);
    const float x = update_point<K, true>(g, 0.0f, vv, mm, ss, hp);
    v[i] = vv;
    io.store1(i, mm, ss);
    sink.one(i, x);
  };

  int64_t i = b;
  const int64_t peel_end = b + sink.peel(b, e);
  for (; i < peel_end; ++i) one(i);
  const FVec vscale(scale);
  for (; i + kMomStep <= e; i += kMomStep) {
    FVec g0, g1;
    G::load(grad + i, g0, g1);
    if (has_scale) {
      g0 = g0 / vscale;
      g1 = g1 / vscale;
    }
    FVec v0 = FVec::loadu(v + i), v1 = FVec::loadu(v + i + kVec), m0, m1, s0(0.0f), s1(0.0f);
    io.load(i, m0, m1, s0, s1);
    const FVec x0 = update_point<K, true>(g0, FVec(0.0f), v0, m0, s0, hp);
    const FVec x1 = update_point<K, true>(g1, FVec(0.0f), v1, m1, s1, hp);
    v0.store(v + i);
    v1.store(v + i + kVec);
    io.store(i, m0, m1, s0, s1);
    sink.vec(i, x0, x1);
  }
  for (; i < e; ++i) one(i);
}

// ---- bf16 -----------------------------------------------------------------------------------
// Widened on load; stochastically rounded on store with the random bits of (the value's top 16
// bits, the tensor's step count, stream 0 for m / 1 for s).
template <bool HAS_S>
struct Bf16Moments {
  uint16_t* m;
  uint16_t* s;
  SrKey key_m, key_s;

  void load(int64_t i, FVec& m0, FVec& m1, FVec& s0, FVec& s1) const {
    load_bf16(m + i, m0, m1);
    if constexpr (HAS_S) load_bf16(s + i, s0, s1);
  }
  void store(int64_t i, const FVec& m0, const FVec& m1, const FVec& s0, const FVec& s1) {
    store_bf16_sr(m + i, m0, m1, key_m);
    if constexpr (HAS_S) store_bf16_sr(s + i, s0, s1, key_s);
  }
  void load1(int64_t i, float& mm, float& ss) const {
    mm = bf16_bits_to_float(m[i]);
    if constexpr (HAS_S) ss = bf16_bits_to_float(s[i]);
  }
  void store1(int64_t i, float mm, float ss) {
    m[i] = round_bf16_sr(mm, key_m.step, kStreamM);
    if constexpr (HAS_S) s[i] = round_bf16_sr(ss, key_s.step, kStreamS);
  }
};

template <typename scalar_t, typename grad_t, Kind K, bool MOM, typename Sink>
inline void sweep_bf16(const TensorWork<float>& t, const MomentWork& mw, int64_t b, int64_t e, bool has_scale,
                       float scale, Sink& sink) {
  Bf16Moments<K == Kind::AdaBreg> io{static_cast<uint16_t*>(mw.m), static_cast<uint16_t*>(mw.s),
                                     SrKey(mw.step, kStreamM), SrKey(mw.step, kStreamS)};
  sweep_io<scalar_t, grad_t, K, MOM>(t, b, e, has_scale, scale, io, sink);
}

// ---- 8-bit ----------------------------------------------------------------------------------
// [note: 8-bit blocks in a pipeline] A block's codes need its new scale, the max of all its new
// values, so they are written only after the whole block is updated. Encoding each block right
// after its update left the core waiting on that chain (last update → max → 1/scale → codes), and
// left the memory streams idle while it encoded (the encoding is pure arithmetic on L1 data: a √
// per element and moment, as long as the update itself). So the two are interleaved: while block
// n is updated, kMomStep elements at a time, each step also encodes as many of block n − 1, whose
// scale is known by then. The new values wait in two L1-resident buffers (one per block in flight).

// The codes of one updated block, written a vector step at a time (step), the rest by finish.
template <bool HAS_S>
struct BlockEncoder {
  const float* mbuf = nullptr;  // the block's new m and r = √s
  const float* rbuf = nullptr;
  int8_t* mc = nullptr;         // its codes (at the block's first element)
  uint8_t* sc = nullptr;
  float inv_m = 0.0f, inv_s = 0.0f;  // BlockCode::inv of its new scales
  int64_t len = 0, done = 0;

  void step() {  // an unusable scale (inv = 0) is left to finish: code 0 for the whole block
    if (done + kMomStep > len) return;
    if (inv_m > 0.0f) encode_m_vec(mbuf + done, inv_m, mc + done);
    if constexpr (HAS_S) {
      if (inv_s > 0.0f) encode_s_vec(rbuf + done, inv_s, sc + done);
    }
    done += kMomStep;
  }
  void finish() {
    if (len == 0) return;
    encode_block_m(mbuf, len, done, inv_m, mc);
    if constexpr (HAS_S) encode_block_s(rbuf, len, done, inv_s, sc);
    len = done = 0;
  }
};

// One block's update: decoded with its old scale on load; the new m and r = √s (AdaBreg's own √s:
// the compiler folds this sqrt into the update's) go to the buffers, their max to the accumulators.
template <bool HAS_S>
struct BlockMoments {
  const int8_t* mc;
  const uint8_t* sc;
  float* mbuf;  // mbuf[i - base]: the block's new m
  float* rbuf;  // rbuf[i - base]: its new r = √s
  int64_t base;
  float m_step, s_step;  // BlockCode::step of the old scales
  FVec vm_step, vs_step;
  BlockEncoder<HAS_S>& previous;  // the block before, encoded meanwhile
  BlockMax<> max_m;
  BlockMax<true> max_r;  // r = √s ≥ +0 or NaN

  void load(int64_t i, FVec& m0, FVec& m1, FVec& s0, FVec& s1) const {
    decode_m_vec(mc + i, vm_step, m0, m1);
    if constexpr (HAS_S) decode_s_vec(sc + i, vs_step, s0, s1);
  }
  void store(int64_t i, const FVec& m0, const FVec& m1, const FVec& s0, const FVec& s1) {
    m0.store(mbuf + (i - base));
    m1.store(mbuf + (i - base) + FVec::size());
    max_m.add(m0);
    max_m.add(m1);
    if constexpr (HAS_S) {
      const FVec r0 = bf_sqrt(s0), r1 = bf_sqrt(s1);
      r0.store(rbuf + (i - base));
      r1.store(rbuf + (i - base) + FVec::size());
      max_r.add(r0);
      max_r.add(r1);
    }
    previous.step();
  }
  void load1(int64_t i, float& mm, float& ss) const {
    mm = decode_m(mc[i], m_step);
    if constexpr (HAS_S) ss = decode_s(sc[i], s_step);
  }
  void store1(int64_t i, float mm, float ss) {
    mbuf[i - base] = mm;
    max_m.add1(mm);
    if constexpr (HAS_S) {
      const float r = bf_sqrt(ss);
      rbuf[i - base] = r;
      max_r.add1(r);
    }
  }
};

// [b, e) of a tensor with 8-bit moments. b and e must be block boundaries: a row start, or a
// multiple of kMomentBlock into a row (run_all's chunks and moment_rows.h's pieces are).
template <typename scalar_t, typename grad_t, Kind K, bool MOM, typename Sink>
inline void sweep_8bit(const TensorWork<float>& t, const MomentWork& mw, int64_t b, int64_t e, bool has_scale,
                       float scale, Sink& sink) {
  constexpr bool kHasS = K == Kind::AdaBreg;
  alignas(64) float mbuf[2][kMomentBlock];
  alignas(64) float rbuf[2][kHasS ? kMomentBlock : 1];
  const int64_t row_len = mw.row_len;
  const int64_t blocks_per_row = (row_len + kMomentBlock - 1) / kMomentBlock;
  auto* mc = static_cast<int8_t*>(mw.m);
  auto* sc = static_cast<uint8_t*>(mw.s);
  BlockEncoder<kHasS> previous;
  int64_t row = b / row_len;
  int64_t off = b - row * row_len;  // the block's offset into its row
  TORCH_INTERNAL_ASSERT(off % kMomentBlock == 0, "8-bit moments: a sweep must start at a block boundary");
  for (int64_t bb = b, n = 0; bb < e; ++n) {
    const int64_t len = std::min(kMomentBlock, row_len - off);
    TORCH_INTERNAL_ASSERT(bb + len <= e, "8-bit moments: a sweep must end at a block boundary");
    const int64_t k = row * blocks_per_row + off / kMomentBlock;  // the block's scale
    const float m_step = block_code(mw.m_scale[k], kQSigned).step;  // decode with the old scales
    const float s_step = kHasS ? block_code(mw.s_scale[k], kQUnsigned).step : 0.0f;
    float* mb = mbuf[n & 1];
    float* rb = rbuf[kHasS ? n & 1 : 0];
    BlockMoments<kHasS> io{mc, sc, mb, rb, bb, m_step, s_step, FVec(m_step), FVec(s_step), previous};
    sweep_io<scalar_t, grad_t, K, MOM>(t, bb, bb + len, has_scale, scale, io, sink);
    previous.finish();
    // this block's new scales (its old ones were read above), and its codes during the next block
    const float scale_m = io.max_m.value();
    mw.m_scale[k] = scale_m;
    previous.mbuf = mb;
    previous.mc = mc + bb;
    previous.inv_m = block_code(scale_m, kQSigned).inv;
    if constexpr (kHasS) {
      const float scale_s = io.max_r.value();
      mw.s_scale[k] = scale_s;
      previous.rbuf = rb;
      previous.sc = sc + bb;
      previous.inv_s = block_code(scale_s, kQUnsigned).inv;
    }
    previous.len = len;
    previous.done = 0;
    bb += len;
    off += len;
    if (off == row_len) {
      off = 0;
      ++row;
    }
  }
  previous.finish();
}

// The sweep of moment format F: sweep.h's for fp32 (unchanged), the walks above otherwise.
template <typename scalar_t, typename grad_t, Kind K, bool MOM, Moments F, typename Sink>
inline void sweep_any(const TensorWork<opmath_t<scalar_t>>& t, const MomentWork& mw, int64_t b, int64_t e,
                      bool has_scale, opmath_t<scalar_t> scale, Sink& sink) {
  if constexpr (F == Moments::Fp32) {
    sweep<scalar_t, grad_t, K, MOM>(t, b, e, has_scale, scale, sink);
  } else if constexpr (F == Moments::Bf16) {
    sweep_bf16<scalar_t, grad_t, K, MOM>(t, mw, b, e, has_scale, scale, sink);
  } else {
    sweep_8bit<scalar_t, grad_t, K, MOM>(t, mw, b, e, has_scale, scale, sink);
  }
}

// Tensor ti's compact moments; a dummy for fp32 moments (Work::moments is empty then).
template <Moments F, typename T>
inline const MomentWork& moment_work(const Work<T>& w, int64_t ti) {
  static const MomentWork none;
  if constexpr (F == Moments::Fp32) {
    return none;
  } else {
    return w.moments[ti];
  }
}

}  // namespace bregman::cpu::detail
