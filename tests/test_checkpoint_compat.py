"""Checkpoints written by bregman_fused 0.1.0 (before the backends/optim restructure) load and
continue: tests/data/checkpoints_0_1_0.pt holds that version's checkpoints after 3 steps and what
it computed in 3 more (made by tests/data/make_checkpoints_0_1_0.py run against it).

The fused backends continue bit for bit (their arithmetic is 0.1.0's). The reference continues
within a few ulps: 0.1.0's spec used torch ops that fuse multiply-adds and ATen's CPU sqrt, which is
not correctly rounded; the spec now rounds every op once, as the kernels do
(backends/rounding.py [note: spec roundings])."""
from __future__ import annotations

import os

import pytest
import torch

import bregman_fused as bf
from bregman_fused.backends import unavailable_reason

DATA = torch.load(os.path.join(os.path.dirname(__file__), "data", "checkpoints_0_1_0.pt"), weights_only=True)

OPTS = {
    "linbreg": lambda ps, backend: bf.LinBreg(ps, lr=0.1, delta=1.3, backend=backend),
    "linbreg_momentum": lambda ps, backend: bf.LinBreg(ps, lr=0.1, momentum=0.8, backend=backend),
    "adabreg": lambda ps, backend: bf.AdaBreg(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, backend=backend),
    "proxsgd": lambda ps, backend: bf.ProxSGD(ps, lr=0.1, backend=backend),
}


def _assert_continues(got, want, backend, what):
    if backend != "reference" or not want.is_floating_point():
        assert torch.equal(got, want), what
    else:
        eps = torch.finfo(want.dtype).eps
        torch.testing.assert_close(got, want, rtol=16 * eps, atol=16 * eps, msg=what)


@pytest.mark.parametrize("case", sorted(DATA["cases"]))
def test_a_0_1_0_checkpoint_continues(case):
    backend, opt_name, _ = case.split("-")
    reason = unavailable_reason(backend, torch.device("cpu"), bf.L1(0.1)) if backend != "reference" else None
    if reason is not None:
        pytest.skip(reason)
    c = DATA["cases"][case]
    ps = [torch.nn.Parameter(t.clone()) for t in c["theta_at_checkpoint"]]
    opt = OPTS[opt_name](ps, backend)  # the regularizer comes from the checkpoint
    opt.load_state_dict(c["checkpoint"])
    for g in DATA["grads"][3:]:
        for p, gi in zip(ps, g):
            p.grad = gi.clone()
        opt.step()
    for i, (got, want) in enumerate(zip(ps, c["theta_after"])):
        _assert_continues(got.detach(), want, backend, f"theta[{i}]")
    state = opt.state_dict()["state"]
    assert state.keys() == c["state_after"].keys()
    for pid, want in c["state_after"].items():
        assert state[pid].keys() == want.keys()
        for key, value in want.items():
            _assert_continues(state[pid][key], value, backend, f"state[{pid}][{key!r}]")
    assert opt.density() == c["density_after"]
