"""Checks of the cross-check table itself: every config really moves θ (a table whose runs do
nothing could not catch a bug), and the dtype-derived tolerance is tight enough to catch a kernel
that is subtly wrong (a 1 % error in lr) while the reference in that dtype passes it."""
import pytest
import torch

import configs
from configs import CONFIGS, STATE_KEYS, inputs, run, tolerance


@pytest.mark.parametrize("cfg", CONFIGS[::7], ids=lambda c: c.id)
def test_reference_table_runs(cfg):
    theta, _, _ = run(cfg, "reference")
    theta0, _ = inputs(cfg)
    if theta0.numel():
        assert not torch.equal(theta, theta0), "the config leaves θ unchanged"


def _errors(cfg, got_theta, got_state, ref_theta, ref_state, r64_theta, r64_state):
    """(error, tolerance) for θ and every state, as assert_matches_reference computes them."""
    out = [((got_theta.double() - r64_theta).abs().max().item(), tolerance(ref_theta, r64_theta, cfg.dtype))]
    for key in STATE_KEYS:
        if key in ref_state:
            out.append(((got_state[key].double() - r64_state[key]).abs().max().item(),
                        tolerance(ref_state[key], r64_state[key], ref_state[key].dtype)))
    return out


FP_CONFIGS = [c for c in CONFIGS[::5] if c.dtype in (torch.float32, torch.float64) and 0 not in c.shape]


@pytest.mark.parametrize("cfg", FP_CONFIGS, ids=lambda c: c.id)
def test_tolerance_catches_a_one_percent_lr_error(cfg, monkeypatch):
    ref_theta, ref_state, _ = run(cfg, "reference")
    r64_theta, r64_state, _ = run(cfg, "reference", dtype=torch.float64)
    # the reference in the tested dtype passes its own tolerance ...
    assert all(err <= tol for err, tol in _errors(cfg, ref_theta, ref_state, ref_theta, ref_state,
                                                   r64_theta, r64_state))
    # ... and a "kernel" whose only bug is lr·1.01 fails it on θ or on a state
    cls, hyper = configs.OPTIMIZERS[cfg.optimizer]
    monkeypatch.setitem(configs.OPTIMIZERS, cfg.optimizer, (cls, {**hyper, "lr": hyper["lr"] * 1.01}))
    bad_theta, bad_state, _ = run(cfg, "reference")
    assert any(err > tol for err, tol in _errors(cfg, bad_theta, bad_state, ref_theta, ref_state,
                                                 r64_theta, r64_state))
