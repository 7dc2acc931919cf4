"""Triton kernels of the bregman_fused backend.

The per-element math (dual updates, proximal maps, row factor) is written once, in
``bregman_math.py``; the two kernels below only differ in how they walk memory:

* ``elementwise_kernel`` — none / L1 / L1Pos: every program takes one (tensor, chunk) entry of the
  bucket's table and runs the whole update on it in blocks of ``BLOCK`` elements.
* ``row_kernel`` — GroupL1L2 / KernelL1L2 ("group") and SparseGroupL1L2 ("sparse_group"): every
  program takes one (tensor, row range) entry, updates the dual of whole rows in registers, reduces
  the norm of each row of the UPDATED dual (after the L1 soft-threshold for sparse_group) and then
  writes θ. Rows longer than the tile take a second sweep. [note: row tiles]

Both kernels update every tensor of a bucket in ONE launch: the tensors are reached through a
table of base addresses (int64), cast to typed pointers in the kernel. [note: pointer table]
Hyper-parameters come from a small float64 table (one row per tensor), passed as data, so nothing
that changes between steps (lr, step count, bias corrections) is a compile-time constant and
changing lr never recompiles. The host caches the table per setting (lr, β, ε, δ, λ, shapes) and
refills only AdaBreg's two bias-correction columns per step. [note: hyper table]

[note: pointer table] Row t of ``table`` (int64, ``TABLE_COLS`` columns) holds the base addresses
of param, grad, dual, exp_avg, exp_avg_sq, then numel, row length n, the slot of t in the counts
output, the row-tile class, and for 8-bit moments the addresses of the two block-scale tensors and
the length of a dim-0 row (moment_kernels.py). Unused states (ProxSGD has no dual, LinBreg β = 0 no
momentum) hold 0 and are never dereferenced. ``entries`` (int64, 3 columns) has one row per program: (tensor t,
first element / row, end element / row). Every entry's first element is a multiple of BLOCK; with
ALIGNED (all base addresses 16-byte aligned, checked on the host) the kernel tells the compiler so
and full blocks are loaded unmasked, which lets it use 128-bit accesses.

[note: row tiles] A program handles R rows of n ≤ C elements as one [R, C] tile, R·C = BLOCK,
with C the smallest power of 4 ≥ n (class k: C = 4^k). The class is per tensor (table column) and
chosen at run time by a ladder of ``if`` branches, so one launch serves conv kernels (n = 9) and
long linear rows alike. Rows longer than BLOCK (class NUM_CLASSES) are walked in BLOCK-sized
pieces twice: the first sweep updates and stores the states and accumulates Σu², the second reads
the updated dual back (after a CTA barrier) and writes θ. ProxSGD has no dual: its second sweep
recomputes the point θ − τg from θ and g, which are only overwritten in that sweep.

[note: hyper table] See bregman_math.py: one float64 row per tensor, columns named by
``HYPER_COLUMNS``, computed in double on the host exactly as ``reference.py`` computes them.
Compute type: float32 for float32 / bfloat16 / float16 parameters (states are float32), float64 for
float64 parameters.

Compact moments (MOMENTS, moment_math.py): bf16 moments are widened on load and stochastically
rounded on store, inside these kernels; the random bits are keyed by the value's top 16 bits and
the step count from ``sr_steps`` (float32, one per table row). 8-bit moments are updated by
moment_kernels.code_block_kernel; the row kernel then only maps the new duals.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .bregman_math import (HP_BC2_SQRT, HP_BETA1, HP_BETA2, HP_COLS, HP_EPS, HP_LR, HP_MOM_SCALE, HP_ONE_MINUS_BETA1,
                           HP_ONE_MINUS_BETA2, HP_PROX_DELTA, HP_STEP_SIZE, HP_THR_L1, HP_THR_ROW, KIND_ADABREG,
                           KIND_PROXSGD, _div, adabreg_step, elementwise_shrink, linbreg_momentum_step, linbreg_update,
                           proxsgd_point, row_factor, row_factor_norm)
from .moment_math import MOMENTS_8BIT, MOMENTS_BF16, STREAM_M, STREAM_S, bf16_decode, bf16_round

# Columns of the per-tensor pointer table. [note: pointer table]
COL_PARAM = tl.constexpr(0)
COL_GRAD = tl.constexpr(1)
COL_DUAL = tl.constexpr(2)
COL_EXP_AVG = tl.constexpr(3)
COL_EXP_AVG_SQ = tl.constexpr(4)
COL_NUMEL = tl.constexpr(5)
COL_ROW_LEN = tl.constexpr(6)
COL_COUNT_SLOT = tl.constexpr(7)
COL_ROW_CLASS = tl.constexpr(8)
COL_EXP_AVG_SCALE = tl.constexpr(9)  # 8-bit moments: block scales, and the length of a dim-0 row
COL_EXP_AVG_SQ_SCALE = tl.constexpr(10)
COL_CODE_ROW_LEN = tl.constexpr(11)
TABLE_COLS = tl.constexpr(12)
ENTRY_COLS = tl.constexpr(3)

# ---- memory access shared by both kernels ------------------------------------------------------
@triton.jit
def _tensor_ptrs(table, t, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                 ALIGNED: tl.constexpr, MOMENTS: tl.constexpr):
    """Typed pointers to param, grad, dual, exp_avg, exp_avg_sq of tensor t. [note: pointer table]
    The moments are S_DTYPE, or stored compact (moment_math.py): bf16 bits, 8-bit codes."""
    row = table + t * TABLE_COLS
    p = tl.load(row + COL_PARAM)
    g = tl.load(row + COL_GRAD)
    v = tl.load(row + COL_DUAL)
    m = tl.load(row + COL_EXP_AVG)
    s = tl.load(row + COL_EXP_AVG_SQ)
    p = p.to(tl.pointer_type(P_DTYPE))
    g = g.to(tl.pointer_type(G_DTYPE))
    v = v.to(tl.pointer_type(S_DTYPE))
    if MOMENTS == MOMENTS_BF16:
        m = m.to(tl.pointer_type(tl.uint16))
        s = s.to(tl.pointer_type(tl.uint16))
    elif MOMENTS == MOMENTS_8BIT:
        m = m.to(tl.pointer_type(tl.int8))
        s = s.to(tl.pointer_type(tl.uint8))
    else:
        m = m.to(tl.pointer_type(S_DTYPE))
        s = s.to(tl.pointer_type(S_DTYPE))
    if ALIGNED:
        # the hint must sit on the pointers (the compiler does not carry it through int → pointer)
        p = tl.multiple_of(p, 16)
        g = tl.multiple_of(g, 16)
        v = tl.multiple_of(v, 16)
        m = tl.multiple_of(m, 16)
        s = tl.multiple_of(s, 16)
    return p, g, v, m, s


@triton.jit
def _load_hyper(hp, t, S_DTYPE: tl.constexpr):
    row = hp + t * HP_COLS
    return (
        tl.load(row + HP_LR).to(S_DTYPE),
        tl.load(row + HP_BETA1).to(S_DTYPE),
        tl.load(row + HP_ONE_MINUS_BETA1).to(S_DTYPE),
        tl.load(row + HP_BETA2).to(S_DTYPE),
        tl.load(row + HP_ONE_MINUS_BETA2).to(S_DTYPE),
        tl.load(row + HP_EPS).to(S_DTYPE),
        tl.load(row + HP_MOM_SCALE).to(S_DTYPE),
        tl.load(row + HP_STEP_SIZE).to(S_DTYPE),
        tl.load(row + HP_BC2_SQRT).to(S_DTYPE),
        tl.load(row + HP_PROX_DELTA).to(S_DTYPE),
        tl.load(row + HP_THR_L1).to(S_DTYPE),
        tl.load(row + HP_THR_ROW).to(S_DTYPE),
    )


@triton.jit
def _sr_step(sr_steps, t, MOMENTS: tl.constexpr):
    """bf16 moments: tensor t's step count (float32, already advanced) as the uint32 of the random
    bits; 0 (unused) for the other formats, which get no count table."""
    if MOMENTS == MOMENTS_BF16:
        step = tl.load(sr_steps + t).to(tl.uint32)
    else:
        step = 0
    return step


@triton.jit
def _load_grad(g_ptr, offs, mask, gs, S_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(S_DTYPE)
    if HAS_GRAD_SCALE:
        g = _div(g, gs)
    return g


@triton.jit
def _load_moment(ptr, offs, mask, MOMENTS: tl.constexpr):
    """A moment at ``offs`` as a float (bf16 widened)."""
    if MOMENTS == MOMENTS_BF16:
        x = bf16_decode(tl.load(ptr + offs, mask=mask, other=0))
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x


@triton.jit
def _store_moment(ptr, offs, x, mask, sr_step, STREAM: tl.constexpr, MOMENTS: tl.constexpr):
    """Store a new moment: as it is, or stochastically rounded to bf16 with the random bits of (its
    value's top 16 bits, the step count, the moment's stream)."""
    if MOMENTS == MOMENTS_BF16:
        tl.store(ptr + offs, bf16_round(x, sr_step, STREAM), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


@triton.jit
def _update(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, offs, mask, gs, hyp, sr_step,
            KIND: tl.constexpr, MOMENTUM: tl.constexpr, S_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
            MOMENTS: tl.constexpr):
    """Load g and the states at ``offs``, update and store the states, return the point x that the
    proximal map is applied to (the new dual v, or θ − τg for ProxSGD). With 8-bit moments the
    states were updated block by block before (moment_kernels.py): only the new dual is read."""
    if MOMENTS == MOMENTS_8BIT:
        x = tl.load(v_ptr + offs, mask=mask, other=0.0)
    elif KIND == KIND_PROXSGD:
        g = _load_grad(g_ptr, offs, mask, gs, S_DTYPE, HAS_GRAD_SCALE)
        theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(S_DTYPE)
        x = proxsgd_point(theta, g, hyp[HP_LR])
    else:
        g = _load_grad(g_ptr, offs, mask, gs, S_DTYPE, HAS_GRAD_SCALE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if KIND == KIND_ADABREG:
            m = _load_moment(m_ptr, offs, mask, MOMENTS)
            s = _load_moment(s_ptr, offs, mask, MOMENTS)
            v, m, s = adabreg_step(v, m, s, g, hyp)
            _store_moment(m_ptr, offs, m, mask, sr_step, STREAM_M, MOMENTS)
            _store_moment(s_ptr, offs, s, mask, sr_step, STREAM_S, MOMENTS)
        elif MOMENTUM:
            m = _load_moment(m_ptr, offs, mask, MOMENTS)
            v, m = linbreg_momentum_step(v, m, g, hyp)
            _store_moment(m_ptr, offs, m, mask, sr_step, STREAM_M, MOMENTS)
        else:
            v = linbreg_update(v, g, hyp[HP_LR])
        tl.store(v_ptr + offs, v, mask=mask)
        x = v
    return x


@triton.jit
def _store_theta(p_ptr, offs, theta, mask, P_DTYPE: tl.constexpr):
    """Write θ in the parameter's dtype; return 1 where the written value is non-zero, else 0.

    Callers add these per lane and reduce once per program (no cross-warp reduction per block)."""
    out = theta.to(P_DTYPE)
    tl.store(p_ptr + offs, out, mask=mask)
    # count in the stored dtype (a tiny float32 value may round to 0 in bf16), compared widened
    nonzero = (out.to(theta.dtype) != 0) & mask
    return nonzero.to(tl.int32)


@triton.jit
def _count_current(p_ptr, start, end, BLOCK: tl.constexpr):
    """Non-zeros of θ[start:end] as it is: what a skipped step (found_inf set) reports, since with
    capturable=True the host cannot know that the step was skipped (reference.py [note: capturable])."""
    nnz = tl.zeros((BLOCK,), tl.int32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        nnz += ((tl.load(p_ptr + offs, mask=mask, other=0.0) != 0) & mask).to(tl.int32)
    return tl.sum(nnz.to(tl.int64))


# ---- element-wise kernel: none / L1 / L1Pos ---------------------------------------------------
@triton.jit
def _elementwise_block(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, offs, mask, gs, hyp, sr_step,
                       KIND: tl.constexpr, REG: tl.constexpr, MOMENTUM: tl.constexpr,
                       P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                       MOMENTS: tl.constexpr):
    x = _update(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, offs, mask, gs, hyp, sr_step, KIND, MOMENTUM, S_DTYPE,
                HAS_GRAD_SCALE, MOMENTS)
    theta = elementwise_shrink(x, hyp[HP_THR_L1], REG) * hyp[HP_PROX_DELTA]
    return _store_theta(p_ptr, offs, theta, mask, P_DTYPE)


@triton.jit
def elementwise_kernel(
    table, entries, hp, counts, grad_scale, found_inf, sr_steps,
    KIND: tl.constexpr, REG: tl.constexpr, MOMENTUM: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MOMENTS: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    entry = entries + pid * ENTRY_COLS
    t = tl.load(entry)
    start = tl.load(entry + 1)
    end = tl.load(entry + 2)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    p_ptr, g_ptr, v_ptr, m_ptr, s_ptr = _tensor_ptrs(table, t, P_DTYPE, G_DTYPE, S_DTYPE, ALIGNED, MOMENTS)
    row = table + t * TABLE_COLS
    slot = tl.load(row + COL_COUNT_SLOT)
    hyp = _load_hyper(hp, t, S_DTYPE)
    sr_step = _sr_step(sr_steps, t, MOMENTS)
    gs = tl.load(grad_scale).to(S_DTYPE) if HAS_GRAD_SCALE else None
    # found_inf set: the program changes nothing and counts the unchanged θ
    ok = (tl.load(found_inf) == 0) if HAS_FOUND_INF else True
    if not ok:
        tl.atomic_add(counts + slot, _count_current(p_ptr, start, end, BLOCK))
    else:
        nnz = tl.zeros((BLOCK,), tl.int32)
        full_end = start + ((end - start) // BLOCK) * BLOCK
        # full blocks under a constant all-true mask: no bounds check, vectorizable
        all_true = tl.full((BLOCK,), 1, tl.int1)
        for off in range(start, full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            nnz += _elementwise_block(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, offs, all_true, gs, hyp, sr_step,
                                      KIND, REG, MOMENTUM, P_DTYPE, S_DTYPE, HAS_GRAD_SCALE, MOMENTS)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            nnz += _elementwise_block(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, offs, offs < end, gs, hyp, sr_step,
                                      KIND, REG, MOMENTUM, P_DTYPE, S_DTYPE, HAS_GRAD_SCALE, MOMENTS)
        tl.atomic_add(counts + slot, tl.sum(nnz.to(tl.int64)))


# ---- row kernel: group / sparse_group ---------------------------------------------------------
@triton.jit
def _row_tiles(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, row_start, row_end, n, gs, hyp, sr_step,
               KIND: tl.constexpr, REG: tl.constexpr, MOMENTUM: tl.constexpr,
               P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
               MOMENTS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """Rows [row_start, row_end) of length n ≤ C, R rows per [R, C] tile, one pass each."""
    nnz = tl.zeros((R, C), tl.int32)
    cols = tl.arange(0, C)[None, :]
    for r0 in range(row_start, row_end, R):
        rows = r0 + tl.arange(0, R)[:, None]
        mask = (rows < row_end) & (cols < n)
        offs = rows * n + cols
        x = _update(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, offs, mask, gs, hyp, sr_step, KIND, MOMENTUM, S_DTYPE,
                    HAS_GRAD_SCALE, MOMENTS)
        # masked lanes can hold 0/0 (AdaBreg with ε = 0): keep them out of the norms
        u = tl.where(mask, elementwise_shrink(x, hyp[HP_THR_L1], REG), 0.0)
        if n == 1:  # the norm of one element is |u| (bregman_math.h [note: one-element rows])
            factor = row_factor_norm(tl.sum(tl.abs(u), axis=1), hyp[HP_THR_ROW])
        else:
            factor = row_factor(tl.sum(u * u, axis=1), hyp[HP_THR_ROW])
        theta = (u * factor[:, None]) * hyp[HP_PROX_DELTA]
        nnz += _store_theta(p_ptr, offs, theta, mask, P_DTYPE)
    return tl.sum(nnz.to(tl.int64))  # int64 before the sum: a long row may hold 2³¹ non-zeros


@triton.jit
def _long_rows(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, row_start, row_end, n, gs, hyp, sr_step,
               KIND: tl.constexpr, REG: tl.constexpr, MOMENTUM: tl.constexpr,
               P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
               MOMENTS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [row_start, row_end) longer than BLOCK: two sweeps per row. [note: row tiles]"""
    nnz = tl.zeros((BLOCK,), tl.int32)
    lane = tl.arange(0, BLOCK)
    for r in range(row_start, row_end):
        base = r * n
        acc = tl.zeros((BLOCK,), S_DTYPE)
        for c0 in range(0, n, BLOCK):
            mask = c0 + lane < n
            offs = base + c0 + lane
            x = _update(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, offs, mask, gs, hyp, sr_step,
                        KIND, MOMENTUM, S_DTYPE, HAS_GRAD_SCALE, MOMENTS)
            u = tl.where(mask, elementwise_shrink(x, hyp[HP_THR_L1], REG), 0.0)
            acc += u * u
        factor = row_factor(tl.sum(acc, axis=0), hyp[HP_THR_ROW])
        # the second sweep reads duals other threads of this program stored in the first one
        tl.debug_barrier()
        for c0 in range(0, n, BLOCK):
            mask = c0 + lane < n
            offs = base + c0 + lane
            if KIND == KIND_PROXSGD:
                g = _load_grad(g_ptr, offs, mask, gs, S_DTYPE, HAS_GRAD_SCALE)
                theta_old = tl.load(p_ptr + offs, mask=mask, other=0.0).to(S_DTYPE)
                x = proxsgd_point(theta_old, g, hyp[HP_LR])
            else:
                x = tl.load(v_ptr + offs, mask=mask, other=0.0)
            u = elementwise_shrink(x, hyp[HP_THR_L1], REG)
            theta = (u * factor) * hyp[HP_PROX_DELTA]
            nnz += _store_theta(p_ptr, offs, theta, mask, P_DTYPE)
    return tl.sum(nnz.to(tl.int64))  # int64 before the sum: a long row may hold 2³¹ non-zeros


@triton.jit
def row_kernel(
    table, entries, hp, counts, grad_scale, found_inf, sr_steps,
    KIND: tl.constexpr, REG: tl.constexpr, MOMENTUM: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MOMENTS: tl.constexpr,
    BLOCK: tl.constexpr, NUM_CLASSES: tl.constexpr,
):
    """BLOCK = 4^(NUM_CLASSES − 1); row class k < NUM_CLASSES: [BLOCK / 4^k, 4^k] tiles;
    class NUM_CLASSES: rows longer than BLOCK. With 8-bit moments it runs after
    moment_kernels.code_block_kernel and only maps the duals that kernel updated."""
    pid = tl.program_id(0).to(tl.int64)
    entry = entries + pid * ENTRY_COLS
    t = tl.load(entry)
    row_start = tl.load(entry + 1)
    row_end = tl.load(entry + 2)
    p_ptr, g_ptr, v_ptr, m_ptr, s_ptr = _tensor_ptrs(table, t, P_DTYPE, G_DTYPE, S_DTYPE, False, MOMENTS)
    row = table + t * TABLE_COLS
    n = tl.load(row + COL_ROW_LEN)
    cls = tl.load(row + COL_ROW_CLASS)
    slot = tl.load(row + COL_COUNT_SLOT)
    hyp = _load_hyper(hp, t, S_DTYPE)
    sr_step = _sr_step(sr_steps, t, MOMENTS)
    gs = tl.load(grad_scale).to(S_DTYPE) if HAS_GRAD_SCALE else None
    # found_inf set: the program changes nothing and counts the unchanged θ
    ok = (tl.load(found_inf) == 0) if HAS_FOUND_INF else True
    if not ok:
        tl.atomic_add(counts + slot, _count_current(p_ptr, row_start * n, row_end * n, BLOCK))
    else:
        for k in tl.static_range(NUM_CLASSES):
            if cls == k:
                nnz = _row_tiles(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, row_start, row_end, n, gs, hyp, sr_step,
                                 KIND, REG, MOMENTUM, P_DTYPE, S_DTYPE, HAS_GRAD_SCALE, MOMENTS,
                                 BLOCK >> (2 * k), 1 << (2 * k))
                tl.atomic_add(counts + slot, nnz)
        if cls == NUM_CLASSES:
            nnz = _long_rows(p_ptr, g_ptr, v_ptr, m_ptr, s_ptr, row_start, row_end, n, gs, hyp, sr_step,
                             KIND, REG, MOMENTUM, P_DTYPE, S_DTYPE, HAS_GRAD_SCALE, MOMENTS, BLOCK)
            tl.atomic_add(counts + slot, nnz)


# Triton decides at decoration time (import of this module) whether @triton.jit functions are
# compiled or interpreted; TRITON_INTERPRET set later changes nothing.
INTERPRETING = type(elementwise_kernel).__name__ == "InterpretedFunction"
