"""Compact moments (moments="bf16" | "8bit") on the fused CPU kernel: its own paths (work chunks
that end inside rows, rows longer than the row maps' scratch, the two-pass row path, non-finite
grads, float grads of bf16 params, channels_last, thread counts), each against the reference. The
shared cross-check of every backend is tests/test_compact_moments.py."""
from __future__ import annotations

import os

import pytest
import torch

import bregman_fused as bf
from bregman_fused.backends import loader


@pytest.fixture(autouse=True)
def _need_cpu():
    if not loader.cpu_available():
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the CPU extension: {loader.cpu_error()}")
        pytest.skip(f"C++ CPU extension unavailable: {loader.cpu_error()}")


# Shapes that reach them: rows longer than a work chunk and not a multiple of the 8-bit block (chunks
# then end inside a row, on block boundaries), a row longer than the row maps' scratch buffer, rows
# of a few blocks with a short last one, and conv weights whose KernelL1L2 rows (kh·kw) split blocks.
COMPACT_SHAPES = [(3, 40_000), (5, 9000), (33, 300), (20, 30, 5, 7)]


class _RowsAcrossBlocks(bf.GroupL1L2):
    """Rows of 400 elements in tensors of (·, 300): neither a multiple nor a divisor of the 8-bit
    blocks' rows, so the CPU kernel's two-pass row path (moment_rows.h run_rows_8bit) runs."""

    keeps_builtin_map = True  # only the row length differs: the fused group map applies

    def group_size(self, shape):
        return 400


COMPACT_REGS = {"none": bf.NoReg, "l1": lambda: bf.L1(0.02), "group": lambda: bf.GroupL1L2(0.02),
                "sparse_group": lambda: bf.SparseGroupL1L2(0.01, 0.02), "kernel": lambda: bf.KernelL1L2(0.02),
                "rows_across_blocks": lambda: _RowsAcrossBlocks(0.02)}


def _compact_run(backend, kind, fmt, reg, shapes, steps=3, dtype=torch.float32, grad_dtype=None, nonfinite=False):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dtype)) for s in shapes]
    for p in params:
        if grad_dtype is not None:
            p.grad_dtype = grad_dtype  # torch's .grad setter wants it named (mixed-precision grads)
    if kind == "adabreg":
        opt = bf.AdaBreg(params, lr=1e-2, reg=COMPACT_REGS[reg](), moments=fmt, backend=backend)
    else:
        opt = bf.LinBreg(params, lr=0.1, momentum=0.9, reg=COMPACT_REGS[reg](), moments=fmt, backend=backend)
    for k in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen).pow(4)
            if nonfinite and k == 1:  # a NaN or inf in a few blocks: their scales and values turn NaN
                g.view(-1)[7::4999] = float("nan")
                g.view(-1)[11::7001] = float("inf")
            p.grad = g.to(grad_dtype or dtype)
        opt.step()
    return params, opt


def _assert_compact_like_reference(got, ref, dtype=torch.float32):
    """Codes and bf16 bits as tests/test_compact_moments.py allows them (at most one step off, in at
    most 1 % of elements: the reference's torch.sqrt is not correctly rounded); floats closely."""
    (params, opt), (ref_params, ref_opt) = got, ref
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for i, (p, r) in enumerate(zip(params, ref_params)):
        st, rst = opt.state[p], ref_opt.state[r]
        assert set(st) == set(rst)
        for key, a in st.items():
            b = rst[key]
            what = f"{key} of param {i} {list(p.shape)}"
            assert a.dtype == b.dtype and a.shape == b.shape, what
            if a.dtype in (torch.int8, torch.uint8, torch.bfloat16):
                bits = (lambda t: t.view(torch.int16).int()) if a.dtype == torch.bfloat16 else (lambda t: t.int())
                diff = (bits(a) - bits(b)).abs()
                diff[a.float().isnan() & b.float().isnan()] = 0
                assert diff.max().item() <= 1, f"{what}: off by {diff.max().item()}"
                assert diff.ne(0).float().mean().item() <= 0.01, what
            else:
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.abs().nan_to_num().max().item()),
                                           equal_nan=True, msg=what)
        torch.testing.assert_close(p.detach().float(), r.detach().float(), rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("reg", list(COMPACT_REGS))
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("kind", ["adabreg", "linbreg-momentum"])
def test_compact_moments_chunks_rows_and_groups_like_reference(kind, fmt, reg):
    shapes = {"kernel": [(20, 30, 5, 7), (128, 64, 3, 3)], "rows_across_blocks": [(24, 300), (40, 300)]}.get(
        reg, COMPACT_SHAPES)
    _assert_compact_like_reference(_compact_run("cpu", kind, fmt, reg, shapes),
                                   _compact_run("reference", kind, fmt, reg, shapes))


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_compact_moments_non_finite_grads_like_reference(fmt):
    shapes = [(40, 300), (3, 40_000)]
    got = _compact_run("cpu", "adabreg", fmt, "l1", shapes, nonfinite=True)
    _assert_compact_like_reference(got, _compact_run("reference", "adabreg", fmt, "l1", shapes, nonfinite=True))
    assert got[0][0].isnan().any()  # the NaNs went through


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_compact_moments_float_grads_of_bf16_params(fmt):
    shapes = [(33, 300), (16, 8, 5, 5)]
    _assert_compact_like_reference(_compact_run("cpu", "adabreg", fmt, "group", shapes, dtype=torch.bfloat16,
                                                grad_dtype=torch.float32),
                                   _compact_run("reference", "adabreg", fmt, "group", shapes, dtype=torch.bfloat16,
                                                grad_dtype=torch.float32), dtype=torch.bfloat16)


def test_bf16_moments_of_a_channels_last_param_follow_its_memory():
    # the random bits of stochastic rounding are drawn per element index in memory
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(16, 8, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    grads = [torch.randn(base.shape, generator=gen).to(memory_format=torch.channels_last) for _ in range(3)]
    states = []
    for backend in ("cpu", "reference"):
        p = torch.nn.Parameter(base.clone())
        opt = bf.AdaBreg([p], lr=1e-2, moments="bf16", backend=backend)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        states.append(opt.state[p])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(states[0][key].view(torch.int16), states[1][key].view(torch.int16)), key


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_compact_moments_do_not_depend_on_thread_count(fmt):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _compact_run("cpu", "adabreg", fmt, "sparse_group", COMPACT_SHAPES)
        torch.set_num_threads(max(2, before))
        many = _compact_run("cpu", "adabreg", fmt, "sparse_group", COMPACT_SHAPES)
    finally:
        torch.set_num_threads(before)
    for p, q in zip(one[0], many[0]):
        assert torch.equal(p, q)
        for key, a in one[1].state[p].items():
            assert torch.equal(a, many[1].state[q][key]), key
