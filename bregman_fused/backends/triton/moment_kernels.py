"""The 8-bit moments kernel of the Triton backend (moments="8bit"; the spec: backends/moments.py).

An 8-bit block's new scale is the max over the whole block of the NEW moments, so a program must
own whole blocks: ``code_block_kernel`` walks (tensor, first block, end block) entries, blocks
numbered row-major (block b is block b mod B of dim-0 row b div B, B = ceil(L/256) blocks per row
of L elements; the last one of a row is shorter; blocks never cross rows). Consecutive blocks tile
memory, so an entry is also one element range. Each loop iteration takes NB blocks as an
[NB, 256] tile and per block:

    decode m (and s) with the old scale -> the float32 update (bregman_math.py, as for fp32 moments),
    on the dual too ->
    new scale = max |m| (r = √s) over the block -> codes and scale stored.

Element-wise maps (none / L1 / L1Pos) write θ in the same pass. The row maps (group /
sparse_group) need the norms of whole rows of the updated dual, and their rows are not the
blocks (KernelL1L2 groups 9 elements), so for them this kernel only updates the states and
``kernels.row_kernel`` (MOMENTS = 8-bit) maps the new duals right after, in the same stream.

bf16 moments need no kernel of their own: kernels.py stores them per element.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .bregman_math import (HP_PROX_DELTA, HP_THR_L1, KIND_ADABREG, _sqrt, adabreg_step, elementwise_shrink,
                           linbreg_momentum_step)
from .kernels import (COL_CODE_ROW_LEN, COL_COUNT_SLOT, COL_EXP_AVG_SCALE, COL_EXP_AVG_SQ_SCALE, ENTRY_COLS,
                      TABLE_COLS, _count_current, _load_grad, _load_hyper, _store_theta, _tensor_ptrs)
from .moment_math import (CODE_BLOCK, MOMENTS_8BIT, Q_SIGNED, Q_UNSIGNED, block_scale, decode_m, decode_s, decode_step,
                          encode_factor, encode_m, encode_s)


@triton.jit
def _block_span(b, row_len, blocks_per_row):
    """First element and length of block b (of a tensor with dim-0 rows of row_len elements)."""
    r = b // blocks_per_row
    j = b - r * blocks_per_row
    return r * row_len + j * CODE_BLOCK, tl.minimum(row_len - j * CODE_BLOCK, CODE_BLOCK)


@triton.jit
def _store_codes(code_ptr, scale_ptr, x, blk, live, offs, mask, SIGNED: tl.constexpr):
    """Code the new float32 moment x (m, or r = √s) of an [NB, CODE_BLOCK] tile: scale per block
    (row of the tile), codes per element; dead lanes and blocks are not written."""
    scale = block_scale(tl.abs(x), mask)
    inv = encode_factor(scale)[:, None]
    if SIGNED:
        codes = encode_m(x, inv)
    else:
        codes = encode_s(x, inv)
    tl.store(code_ptr + offs, codes, mask=mask)
    tl.store(scale_ptr + blk, scale, mask=live)


@triton.jit
def _code_tile(g_ptr, v_ptr, m_ptr, s_ptr, a_ptr, b_ptr, blk, live, offs, mask, gs, hyp,
               KIND: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """Decode, update and re-code the moments of one tile, update and store its dual; return it."""
    g = _load_grad(g_ptr, offs, mask, gs, tl.float32, HAS_GRAD_SCALE)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    a_old = decode_step(tl.load(a_ptr + blk, mask=live, other=0.0), Q_SIGNED)[:, None]
    m = decode_m(tl.load(m_ptr + offs, mask=mask, other=0), a_old)
    if KIND == KIND_ADABREG:
        b_old = decode_step(tl.load(b_ptr + blk, mask=live, other=0.0), Q_UNSIGNED)[:, None]
        s = decode_s(tl.load(s_ptr + offs, mask=mask, other=0), b_old)
        v, m, s = adabreg_step(v, m, s, g, hyp)
        # s is coded by r = √s, the root the update took (the same correctly rounded _sqrt)
        _store_codes(s_ptr, b_ptr, _sqrt(s), blk, live, offs, mask, False)
    else:  # LinBreg with momentum: the only other kind with a moment
        v, m = linbreg_momentum_step(v, m, g, hyp)
    _store_codes(m_ptr, a_ptr, m, blk, live, offs, mask, True)
    tl.store(v_ptr + offs, v, mask=mask)
    return v


@triton.jit
def code_block_kernel(
    table, entries, hp, counts, grad_scale, found_inf,
    KIND: tl.constexpr, REG: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, WRITE_THETA: tl.constexpr, NB: tl.constexpr,
):
    """Blocks [b0, b1) of tensor t per program (entries: t, b0, b1). WRITE_THETA: apply the
    element-wise map REG and count θ's non-zeros; else only the states (row maps follow)."""
    pid = tl.program_id(0).to(tl.int64)
    entry = entries + pid * ENTRY_COLS
    t = tl.load(entry)
    b0 = tl.load(entry + 1)
    b1 = tl.load(entry + 2)
    # compact moments are for float32/bf16/fp16 params: the states are float32
    p_ptr, g_ptr, v_ptr, m_ptr, s_ptr = _tensor_ptrs(table, t, P_DTYPE, G_DTYPE, tl.float32, False, MOMENTS_8BIT)
    row = table + t * TABLE_COLS
    a_ptr = tl.load(row + COL_EXP_AVG_SCALE).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(row + COL_EXP_AVG_SQ_SCALE).to(tl.pointer_type(tl.float32))
    row_len = tl.load(row + COL_CODE_ROW_LEN)
    blocks_per_row = (row_len + CODE_BLOCK - 1) // CODE_BLOCK
    slot = tl.load(row + COL_COUNT_SLOT)
    hyp = _load_hyper(hp, t, tl.float32)
    gs = tl.load(grad_scale).to(tl.float32) if HAS_GRAD_SCALE else None
    # found_inf set: the program changes nothing and counts the unchanged θ
    ok = (tl.load(found_inf) == 0) if HAS_FOUND_INF else True
    if not ok:
        if WRITE_THETA:
            start, _ = _block_span(b0, row_len, blocks_per_row)
            last, last_len = _block_span(b1 - 1, row_len, blocks_per_row)
            tl.atomic_add(counts + slot, _count_current(p_ptr, start, last + last_len, NB * CODE_BLOCK))
    else:
        nnz = tl.zeros((NB, CODE_BLOCK), tl.int32)
        lane = tl.arange(0, CODE_BLOCK)[None, :]
        for first in range(b0, b1, NB):
            blk = first + tl.arange(0, NB)
            live = blk < b1
            start, length = _block_span(blk, row_len, blocks_per_row)
            offs = start[:, None] + lane
            mask = live[:, None] & (lane < length[:, None])
            x = _code_tile(g_ptr, v_ptr, m_ptr, s_ptr, a_ptr, b_ptr, blk, live, offs, mask, gs, hyp,
                           KIND, HAS_GRAD_SCALE)
            if WRITE_THETA:
                theta = elementwise_shrink(x, hyp[HP_THR_L1], REG) * hyp[HP_PROX_DELTA]
                nnz += _store_theta(p_ptr, offs, theta, mask, P_DTYPE)
        if WRITE_THETA:
            tl.atomic_add(counts + slot, tl.sum(nnz.to(tl.int64)))
