"""The backends agree, bit for bit, on inputs the tables do not generate: a step counter shared by
several params (the functional API allows it), NaN grads (θ keeps the grad's NaN, signs included),
and a model of which only a part was converted after a step (refused, with what to do)."""
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
