"""The backends agree, bit for bit, on inputs the tables do not generate: a step counter shared by
several params (the functional API allows it), NaN grads (θ keeps the grad's NaN, signs included),
rows of one element whose square leaves the normal range, and a model of which only a part was
converted after a step (refused, with what to do)."""
from __future__ import annotations

import os

import pytest
import torch

import bregman_fused as bf
from bregman_fused import functional as F
from bregman_fused.backends import unavailable_reason

from configs import same_bits


def _runnable(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return "Triton needs a GPU or TRITON_INTERPRET=1"
    return None if backend == "reference" else unavailable_reason(backend, torch.device("cpu"), bf.NoReg())


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(_runnable(b) is not None, reason=str(_runnable(b))))
            for b in ("cpu", "triton")]


def _adabreg_with_one_counter(backend):
    torch.manual_seed(0)
    params = [torch.randn(3), torch.randn(4)]
    grads = [torch.randn(3), torch.randn(4)]
    states = F.init_states("adabreg", params, reg=bf.L1(0.1))
    shared = torch.zeros(())
    states["steps"] = [shared, shared]
    F.adabreg(params, grads, **states, lr=0.1, reg=bf.L1(0.1), backend=backend)
    return params, states, shared


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_counter_shared_by_several_params_is_read_after_all_adds(backend):
    # the reference adds one per list entry, then reads: both params see t = 2
    ref, ref_states, ref_count = _adabreg_with_one_counter("reference")
    got, got_states, count = _adabreg_with_one_counter(backend)
    assert float(count) == float(ref_count) == 2.0
    for a, b in zip(got + got_states["exp_avgs"] + got_states["duals"], ref + ref_states["exp_avgs"] + ref_states["duals"]):
        assert same_bits(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", [bf.L1(0.5), bf.NoReg(), bf.L1Pos(0.5)], ids=repr)
@pytest.mark.parametrize("cls", [bf.LinBreg, bf.ProxSGD])
def test_nan_grads_and_zeroed_negatives_have_the_references_bits(backend, reg, cls):
    def run(backend):
        p = torch.nn.Parameter(torch.tensor([-0.3, 0.2, -2.0, 2.0, 0.1, -0.1]))
        opt = cls([p], lr=1.0, reg=reg, backend=backend)
        nan = torch.tensor(float("nan"))
        p.grad = torch.stack([-nan.abs(), nan.abs(), torch.tensor(1.0), torch.tensor(-1.0),
                              torch.tensor(0.05), torch.tensor(-0.05)])  # both NaN signs
        opt.step()
        return p.detach()

    assert same_bits(run(backend), run("reference"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_a_partly_converted_model_is_refused_with_what_to_do(backend, dtype):
    # only the second layer converted: the first param still fits its bucket; the cpu op's check, or
    # the optimizer's check of every param of a reference/Triton bucket, refuses it with the way out
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    opt = bf.AdaBreg(m.parameters(), backend=backend)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    m[1].to(dtype)  # bf16: its float32 states would still fit, refused all the same
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises((ValueError, RuntimeError), match=r"load_state_dict\(opt.state_dict\(\)\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


# Rows of one element (GroupL1L2 on a 1-D tensor, KernelL1L2 on 1×1 kernels): their norm is |u|, as
# torch's vector_norm gives it, also where u² would underflow (|u| < 1.1e-19: a subnormal or zero
# square) or overflow (|u| ≥ 1.8e19). The shapes reach the kernels' one-pass row groups and, with
# 8-bit moments and dim-0 rows longer than the CPU's scratch buffer, its two-pass row maps.
ONE_ELEMENT_ROWS = [
    pytest.param(bf.LinBreg, {}, (300,), bf.GroupL1L2(1e-22), 1.0, id="linbreg-group-1d"),
    pytest.param(bf.LinBreg, {}, (50, 3, 1, 1), bf.SparseGroupL1L2(1e-40, 1e-22), 1.0, id="linbreg-sparse-group-1x1"),
    pytest.param(bf.LinBreg, {"momentum": 0.9, "moments": "8bit"}, (2, 9000, 1, 1), bf.KernelL1L2(1e-22), 1.0,
                 id="momentum-8bit-kernel-1x1-long-dim0-rows"),
    pytest.param(bf.AdaBreg, {}, (600,), bf.GroupL1L2(1e-22), 1e-20, id="adabreg-group-1d"),
    pytest.param(bf.AdaBreg, {"moments": "8bit"}, (300, 16, 1, 1), bf.KernelL1L2(1e-22), 1e-20, id="adabreg-8bit-1x1"),
    pytest.param(bf.AdaBreg, {"moments": "bf16"}, (40, 5, 1, 1), bf.KernelL1L2(1e-22), 1e-20, id="adabreg-bf16-1x1"),
    pytest.param(bf.LinBreg, {}, (300,), bf.GroupL1L2(1e13), 1.0, id="linbreg-group-1d-overflowing-squares"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # Triton's interpreter: squares of 1e20
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, options, shape, reg, lr", ONE_ELEMENT_ROWS)
def test_rows_of_one_element_have_the_norm_abs_u_at_both_ends_of_the_range(backend, cls, options, shape, reg, lr):
    def run(backend):
        gen = torch.Generator().manual_seed(0)
        numel = torch.Size(shape).numel()
        # |g| spread evenly over 1e-45 … 1e20, shuffled, one sign per element (no cancellation over
        # the steps): squares that underflow to 0, are subnormal, normal, or overflow
        magnitude = 10.0 ** torch.linspace(-45, 20, numel)[torch.randperm(numel, generator=gen)]
        grad = (magnitude * (torch.randint(0, 2, (numel,), generator=gen) * 2.0 - 1.0)).reshape(shape)
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = cls([p], lr=lr, reg=reg, backend=backend, **options)
        for scale in (1.0, 0.5):
            p.grad = grad * scale
            opt.step()
        return [p.detach(), *(t for t in opt.state[p].values() if torch.is_tensor(t))]

    got, want = run(backend), run("reference")
    assert len(got) == len(want)
    assert all(same_bits(a, b) for a, b in zip(got, want))


# β1 ≤ 0.5 takes lerp's second branch, b − (b − a)·(1 − w): as torch.lerp, the kernels form 1 − w
# from the weight w = 1 − β1 rounded to float32, and so does the spec (rounding.lerp_). 0.50000001:
# 1 − β1 is below 0.5 in double but rounds to 0.5 in float32, so the branch too is the rounded one's.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moments", ["fp32", "8bit"])
@pytest.mark.parametrize("beta1", [0.1, 0.2, 0.50000001, 0.5, 0.9])
def test_adabreg_moments_have_the_references_bits_for_any_beta1(backend, moments, beta1):
    def run(backend):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(2, 300, generator=gen))
        opt = bf.AdaBreg([p], lr=1e-3, betas=(beta1, 0.95), reg=bf.L1(0.1), moments=moments, backend=backend)
        for _ in range(3):
            p.grad = torch.randn(2, 300, generator=gen)
            opt.step()
        return [p.detach(), *(t for t in opt.state[p].values() if torch.is_tensor(t))]

    got, want = run(backend), run("reference")
    assert all(same_bits(a, b) for a, b in zip(got, want))


# ---- the functional API accepts the same calls on every backend ------------------------------------
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_functional_steps_on_leaves_that_require_grad_outside_no_grad(backend):
    # as torch.optim's functional API is called from an optimizer's step: here without no_grad; the
    # fused ops write leaves in place, and so does the spec (it used to raise after writing the duals)
    def run(backend):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(16, 300, generator=gen))
        states = F.init_states("adabreg", [p], reg=bf.L1(0.1), moments="8bit")
        F.adabreg([p], [torch.randn(16, 300, generator=gen)], **states, lr=1e-3, reg=bf.L1(0.1), backend=backend)
        return [p.detach(), *(t for lst in states.values() for t in lst)]

    got, want = run(backend), run("reference")
    assert all(same_bits(a, b) for a, b in zip(got, want))


def _functional_inputs():
    params = [torch.randn(4, 5), torch.randn(3)]
    grads = [torch.randn(4, 5), torch.randn(3)]
    return params, grads, F.init_states("adabreg", params, reg=bf.L1(0.1))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("bad", ["mixed-dtypes", "scales-with-fp32-moments"])
def test_functional_calls_one_backend_refuses_every_backend_refuses_before_writing(backend, bad):
    params, grads, states = _functional_inputs()
    if bad == "mixed-dtypes":
        params[1], grads[1] = params[1].bfloat16(), grads[1].bfloat16()
        match = r"params\[1\].*all params of one call share"  # the cpu op's words or contract.check_tensors'
    else:
        states["exp_avg_scales"] = [torch.ones(4, 1), torch.ones(3, 1)]
        match = "only 8-bit moments have block scales"
    before = [t.clone() for t in params + [t for lst in states.values() for t in lst]]
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        F.adabreg(params, grads, **states, lr=1e-3, reg=bf.L1(0.1), backend=backend)
    after = params + [t for lst in states.values() for t in lst]
    assert all(same_bits(a, b) for a, b in zip(before, after))
