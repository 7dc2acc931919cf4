"""Compact moments (moments="bf16" | "8bit", backends/moments.py): the spec's codes, every fused
backend against it, and the optimizer around them (states, buckets, conversions, bytes)."""
from __future__ import annotations

import math
import os

import pytest
import torch

import bregman_fused as bf
from bregman_fused.backends import moments, unavailable_reason
from bregman_fused.regularizers import NoReg


# ---- the spec ---------------------------------------------------------------------------------
def _python_random_bits(index: int, step: int, stream: int) -> int:
    """moments.random_bits written with Python ints (a second reading of the hash)."""
    mask = 0xFFFFFFFF
    x = ((index * 0x9E3779B1) ^ (step * 0x85EBCA77) ^ (stream * 0xC2B2AE3D)) & mask
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & mask
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & mask
    x ^= x >> 16
    return x >> 16


def test_random_bits_are_the_uint32_hash():
    idx = torch.tensor([0, 1, 2, 255, 256, 2**31 - 1, 2**32 - 1, 123456789])
    for step in (1, 2, 1000, 2**24):
        for stream in (0, 1):
            got = moments.random_bits(idx, step, stream).tolist()
            assert got == [_python_random_bits(int(i), step, stream) for i in idx]


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    # one value an eighth of the way to the next bf16, rounded at 20,000 steps: up an eighth of the time
    x = torch.tensor([1.0 + 2**-10])
    r = torch.cat([moments.round_bf16(x, step, 0) for step in range(1, 20_001)]).to(torch.float32)
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    # the fraction rounded up is 1/8 ± 0.0023 (binomial std over 20,000 draws): 4 std on the mean
    assert r.mean().item() == pytest.approx(x.item(), abs=4 * 0.0023 * 2**-7)
    # values spread over many bf16 intervals and binades: each rounds to a neighbour, and each one's
    # mean over 4,000 steps is itself (4 binomial std)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 64)
    ulp = (v.abs().to(torch.bfloat16).float() * 2**-7)
    total = torch.zeros(64, dtype=torch.float64)
    for step in range(1, 4001):
        rv = moments.round_bf16(v, step, 0).to(torch.float32)
        assert ((rv - v).abs() <= ulp * 2).all()
        total += rv.double()
    assert ((total / 4000 - v.double()).abs() <= 4 * 0.5 * ulp.double() / 4000**0.5).all()
    # the streams draw different bits; NaN becomes the canonical bf16 NaN
    assert not torch.equal(moments.round_bf16(v[:64], 7, 0), moments.round_bf16(v[:64], 7, 1))
    nan = moments.round_bf16(torch.tensor([float("nan"), -float("nan")]), 1, 0)
    assert nan.view(torch.int16).tolist() == [0x7FC0, 0x7FC0]


def test_stochastic_rounding_does_not_depend_on_where_a_value_is_stored():
    """The random bits are keyed by the value's top 16 bits: a permuted, sliced or sharded tensor
    rounds each value as the whole tensor does (what makes FSDP2 shards and copied layouts agree),
    and a value one ulp away rounds alike unless it crosses the threshold."""
    v = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    whole = moments.round_bf16(v, 3, 1)
    perm = torch.randperm(4096, generator=torch.Generator().manual_seed(2))
    assert torch.equal(moments.round_bf16(v[perm], 3, 1), whole[perm])
    assert torch.equal(moments.round_bf16(v[2048:], 3, 1), whole[2048:])
    nudged = moments.round_bf16(torch.nextafter(v, torch.full_like(v, float("inf"))), 3, 1)
    assert (nudged != whole).float().mean().item() < 0.005


def test_8bit_round_trip_error_is_within_half_a_code():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 600, generator=gen) * torch.logspace(-6, 0, 600)
    codes, scale = moments.to_storage(m, "8bit", signed=True)
    assert codes.dtype == torch.int8 and scale.shape == (5, 3) and codes.abs().max() <= 127
    back = moments.decode_m(codes, scale)
    # the code is rint of 127·√(|m|/a): decoding is within half a code in the √ domain
    a = torch.nn.functional.pad(scale, (0, 0)).repeat_interleave(256, dim=1)[:, :600]
    err = ((back.abs() / a).sqrt() - (m.abs() / a).sqrt()).abs() * 127
    assert err.max() <= 0.5 + 1e-4
    assert torch.equal(back.sign() * (back != 0), m.sign() * (back != 0))
    s = m.square()
    q, b = moments.to_storage(s, "8bit", signed=False)
    assert q.dtype == torch.uint8
    s_back = moments.decode_s(q, b)
    rel = ((s_back.sqrt() / b.repeat_interleave(256, 1)[:, :600]).sqrt() - (s.sqrt() / b.repeat_interleave(256, 1)[:, :600]).sqrt()).abs() * 255
    assert rel.max() <= 0.5 + 1e-4


def test_8bit_zero_and_non_finite_blocks():
    m = torch.zeros(2, 300)
    m[1, 10] = float("nan")
    codes, scale = moments.to_storage(m, "8bit", signed=True)
    assert codes.eq(0).all()
    assert scale[0].eq(0).all() and torch.isnan(scale[1, 0]) and scale[1, 1] == 0
    back = moments.decode_m(codes, scale)
    assert back[0].eq(0).all() and torch.isnan(back[1, :256]).all() and back[1, 256:].eq(0).all()


def test_small_1d_and_non_contiguous_params_keep_fp32_with_8bit():
    assert moments.storage(torch.empty(64, 64), "8bit") == "8bit"
    assert moments.storage(torch.empty(63, 64), "8bit") == "fp32"  # 4032 < MIN_8BIT_NUMEL
    assert moments.storage(torch.empty(10_000), "8bit") == "fp32"  # 1-D
    assert moments.storage(torch.empty(64, 80).t(), "8bit") == "fp32"  # not contiguous
    assert moments.storage(torch.empty(3), "bf16") == "bf16"
    # rows of fewer than MIN_8BIT_ROW elements: every row has its own scales
    assert moments.storage(torch.empty(4096, 1), "8bit") == "fp32"
    assert moments.storage(torch.empty(1000, 5, 1, 3), "8bit") == "fp32"
    assert moments.storage(torch.empty(300, 16, 1, 1), "8bit") == "8bit"


@pytest.mark.parametrize("shape", [(4096, 1), (8192, 2), (1000, 15), (300, 16), (50_000, 16), (64, 257), (1024, 1024)])
def test_8bit_state_bytes_follow_the_documented_formula_and_never_exceed_fp32(shape):
    def per_param(fmt):
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = bf.AdaBreg([p], moments=fmt, backend="cpu")
        p.grad = torch.ones(shape)
        opt.step()
        return bf.state_bytes(opt)["bytes"] / p.numel()

    row = math.prod(shape[1:])
    compact = row >= moments.MIN_8BIT_ROW
    formula = 4 + 2 * (1 + 4 * -(-row // 256) / row) if compact else 12.0
    step_counter = 4 / math.prod(shape)
    assert per_param("8bit") == pytest.approx(formula + step_counter)
    assert per_param("8bit") <= 6.5 + step_counter or not compact
    assert per_param("8bit") <= per_param("fp32")


# ---- every fused backend against the spec -------------------------------------------------------
# shapes: element-wise odd sizes, rows shorter than a block, rows of several blocks with a short
# last one, and tensors that keep fp32 moments (small, 1-D) in the same group
SHAPES = [(37,), (70, 65), (9, 700), (20, 3, 7, 7)]
REGS = {"none": NoReg(), "l1": bf.L1(0.05), "group": bf.GroupL1L2(0.05)}
CASES = [(kind, fmt, reg, dtype) for kind in ("adabreg", "linbreg-momentum") for fmt in ("bf16", "8bit")
         for reg in REGS for dtype in (torch.float32, torch.bfloat16, torch.float16)]
STEPS = 4


def _train(backend: str, kind: str, fmt: str, reg: str, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(device=device, dtype=dtype)) for s in SHAPES]
    if kind == "adabreg":
        opt = bf.AdaBreg(params, lr=1e-2, reg=REGS[reg], moments=fmt, backend=backend)
    else:
        opt = bf.LinBreg(params, lr=0.1, momentum=0.9, reg=REGS[reg], moments=fmt, backend=backend)
    for _ in range(STEPS):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen).pow(4)).to(device, dtype)
        opt.step()
    return params, opt


def _skip_unless(backend: str, device: str, fmt: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")
    reason = unavailable_reason(backend, torch.device(device), NoReg(), fmt)
    if reason is not None:
        pytest.skip(reason)


def assert_moments_match(got: torch.Tensor, ref: torch.Tensor, what: str):
    """[note: compact moments tolerance] Codes (8-bit) and bf16 bits must equal the reference's
    exactly: every backend runs the reference's float update op for op, each op rounded once
    (backends/rounding.py [note: spec roundings]), so the values before rounding are the same bits
    and so are their codes. A single differing code is a wrong kernel."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    if ref.dtype == torch.bfloat16:
        got, ref = got.view(torch.int16), ref.view(torch.int16)
    differ = got.ne(ref)
    assert not differ.any(), f"{what}: {int(differ.sum())} of {differ.numel()} codes/bits differ"


def assert_matches_reference(backend: str, kind: str, fmt: str, reg: str, dtype, device="cpu"):
    params, opt = _train(backend, kind, fmt, reg, dtype, device)
    ref_params, ref_opt = _train("reference", kind, fmt, reg, dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for i, (p, r) in enumerate(zip(params, ref_params)):
        st, rst = opt.state[p], ref_opt.state[r]
        assert set(st) == set(rst)
        for key in st:
            got, ref = st[key].cpu(), rst[key]
            if key in ("exp_avg", "exp_avg_sq", "momentum_buffer") and got.dtype != torch.float32:
                assert_moments_match(got, ref, f"{key} of param {i} {list(p.shape)}")
            else:
                # duals, scales, fp32 moments of small params: float values, the table's tolerance
                torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * max(1.0, ref.abs().max().item()),
                                           msg=f"{key} of param {i}")
        torch.testing.assert_close(p.detach().cpu().float(), r.detach().float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind,fmt,reg,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_cpu_matches_reference(kind, fmt, reg, dtype):
    _skip_unless("cpu", "cpu", fmt)
    assert_matches_reference("cpu", kind, fmt, reg, dtype)


@pytest.mark.parametrize("kind,fmt,reg,dtype", [c for c in CASES if c[3] != torch.float16],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_triton_interpreter_matches_reference(kind, fmt, reg, dtype):
    _skip_unless("triton", "cpu", fmt)
    assert_matches_reference("triton", kind, fmt, reg, dtype)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind,fmt,reg,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_gpu_matches_reference(backend, kind, fmt, reg, dtype):
    _skip_unless(backend, "cuda", fmt)
    assert_matches_reference(backend, kind, fmt, reg, dtype, device="cuda")
