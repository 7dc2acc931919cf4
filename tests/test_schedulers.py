"""λ scheduler: θ is kept when λ changes, the schedule runs as documented, unknown names raise."""
import pytest
import torch

import bregman_fused as bf
from bregman_fused.schedulers import LamdaScheduler, set_strength


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 30, generator=g)
    w[torch.rand(20, 30, generator=g) < 0.7] = 0.0  # some zeros, so the L1 subgradient is non-trivial
    return [torch.nn.Parameter(w), torch.nn.Parameter(torch.randn(30, generator=g))]


def _grads(params, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _run(opt, params, steps, seed0=0):
    for k in range(steps):
        _grads(params, seed0 + k)
        opt.step()


def _opt(params, cls=bf.LinBreg, lamda=0.01, **kw):
    return cls([{"params": params[:1], "reg": bf.L1(lamda)}, {"params": params[1:]}], backend="reference",
               **({"lr": 0.05} | kw))


@pytest.mark.parametrize("cls", [bf.LinBreg, bf.AdaBreg])
def test_lamda_change_keeps_theta_and_next_step_starts_from_it(cls):
    params = _params()
    opt = _opt(params, cls)
    _run(opt, params, 5)
    sched = LamdaScheduler(opt, 0, target_density=0.0, step=0.05)  # always too dense: λ goes up
    theta = params[0].detach().clone()
    assert sched.step() is True
    assert sched.lamda == pytest.approx(0.06)
    assert opt.param_groups[0]["reg"].lamda == pytest.approx(0.06)
    assert torch.equal(params[0], theta)  # θ before == θ after
    # the dual now encodes θ under the new λ: v = θ/δ + λ_new·sign(θ)
    dual = opt.state[params[0]]["dual"]
    torch.testing.assert_close(dual, theta + 0.06 * torch.sign(theta))
    # the next step starts from θ: it equals a fresh optimizer with λ_new started at θ
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = _opt(fresh_params, cls, lamda=0.06)
    for p, q in zip(params, fresh_params):  # carry the moments/step counts, only the dual is new
        for key, value in opt.state[p].items():
            if key != "dual":
                fresh.state[q][key] = value.clone()
        fresh.state[q]["dual"] = opt.state[p]["dual"].clone()
    _grads(params, 99)
    _grads(fresh_params, 99)
    opt.step()
    fresh.step()
    for p, q in zip(params, fresh_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_zero_step_after_lamda_change_reproduces_theta_but_not_without_reinit():
    params = _params(1)
    opt = _opt(params)
    _run(opt, params, 5)
    theta = params[0].detach().clone()
    LamdaScheduler(opt, 0, target_density=0.0, step=0.05).step()
    opt.param_groups[0]["lr"] = 0.0
    _grads(params, 7)
    opt.step()
    torch.testing.assert_close(params[0], theta, rtol=1e-6, atol=1e-6)
    assert torch.equal(params[0] != 0, theta != 0)
    # the bug the reinit prevents: change λ, keep the old dual -> every weight shrinks by Δλ at once
    opt.param_groups[0]["reg"].lamda += 0.05
    opt.step()
    assert not torch.allclose(params[0], theta, atol=1e-3)
    torch.testing.assert_close(params[0].detach().abs(), (theta.abs() - 0.05).clamp(min=0), rtol=1e-6, atol=1e-6)


def test_unknown_strength_names_raise():
    params = _params()
    opt = _opt(params)
    # the research scheduler wrote `reg.mu`; here that fails loudly instead of doing nothing
    with pytest.raises(AttributeError, match="mu"):
        LamdaScheduler(opt, 0, target_density=0.1, attr="mu")
    reg = opt.param_groups[0]["reg"]
    with pytest.raises(AttributeError, match="mu"):
        set_strength(reg, "mu", 0.5)
    assert not hasattr(reg, "mu") and reg.lamda == 0.01
    with pytest.raises(ValueError, match="no regularization strength"):
        LamdaScheduler(opt, 1, target_density=0.1)  # group 1 is unregularized (NoReg)
    sg = bf.LinBreg([{"params": _params()[:1], "reg": bf.SparseGroupL1L2(0.01, 0.02)}], backend="reference")
    with pytest.raises(ValueError, match="attr"):
        LamdaScheduler(sg, 0, target_density=0.1)
    sched = LamdaScheduler(sg, 0, target_density=0.0, attr="lamda_group", step=0.01)
    sched.step()
    assert sg.param_groups[0]["reg"].lamda_group == pytest.approx(0.03)
    assert sg.param_groups[0]["reg"].lamda_l1 == pytest.approx(0.01)
    with pytest.raises(IndexError):
        LamdaScheduler(opt, 5, target_density=0.1)
    with pytest.raises(KeyError):
        LamdaScheduler(opt, 0, target_density=0.1).load_state_dict({"mu": 1.0})


def test_warmup_cooldown_and_direction():
    params = _params()
    opt = _opt(params)
    sched = LamdaScheduler(opt, 0, target_density=0.05, warmup=2, cooldown=1, step=0.01)
    lamdas, changed = [], []
    for _ in range(8):
        changed.append(sched.step(density=0.5))  # too dense
        lamdas.append(round(sched.lamda, 10))
    assert changed == [False, False, True, False, True, False, True, False]
    assert lamdas == [0.01, 0.01, 0.02, 0.02, 0.03, 0.03, 0.04, 0.04]
    # too sparse: λ goes down, clipped at min_lamda
    sched = LamdaScheduler(opt, 0, target_density=0.05, step=0.03, min_lamda=0.0)
    sched.step(density=0.0)
    assert sched.lamda == pytest.approx(0.01)
    assert sched.step(density=0.0) is True and sched.lamda == 0.0
    assert sched.step(density=0.0) is False  # already at the bound: no change, no reinit
    assert sched.step(density=0.05) is False  # on target


def test_multiplicative_scales_all_strengths_and_uses_group_density():
    params = _params()
    sg = bf.LinBreg([{"params": params[:1], "reg": bf.SparseGroupL1L2(0.01, 0.02)}], backend="reference")
    sched = LamdaScheduler(sg, 0, target_density=0.01, mode="multiplicative", factor=2.0)
    assert sched.group_density() == pytest.approx(float((params[0] != 0).float().mean()))
    sched.step()  # ~30 % dense > 1 %: stronger
    reg = sg.param_groups[0]["reg"]
    assert (reg.lamda_l1, reg.lamda_group) == pytest.approx((0.02, 0.04))
    sched = LamdaScheduler(sg, 0, target_density=0.9, mode="multiplicative", factor=4.0)
    sched.step()
    assert (reg.lamda_l1, reg.lamda_group) == pytest.approx((0.005, 0.01))


def test_state_dict_round_trip_continues_the_schedule():
    params = _params()
    opt = _opt(params)
    a = LamdaScheduler(opt, 0, target_density=0.05, warmup=1, cooldown=2, step=0.01)
    for _ in range(3):
        a.step(density=0.5)
    sd = a.state_dict()
    assert sd["calls"] == 3 and sd["cooldown_left"] == 1
    b = LamdaScheduler(opt, 0, target_density=0.5, warmup=0, cooldown=0, step=1.0)
    b.load_state_dict(sd)
    assert b.state_dict() == sd
    seq_a, seq_b = [], []
    for _ in range(5):
        seq_a.append(a.step(density=0.5))
    opt.param_groups[0]["reg"].lamda = 0.02  # back to where b starts (a moved it)
    for _ in range(5):
        seq_b.append(b.step(density=0.5))
    assert seq_a == seq_b == [False, True, False, False, True]


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_the_bounds_stop_lamda_in_both_modes(mode):
    p = torch.nn.Parameter(torch.ones(10))
    opt = bf.LinBreg([p], reg=bf.L1(0.5), backend="reference")
    sched = LamdaScheduler(opt, target_density=0.1, mode=mode, step=0.3, factor=2.0, max_lamda=1.0, min_lamda=0.2)
    for _ in range(4):
        sched.step(density=1.0)  # too dense: λ rises to the upper bound and stays there
    assert sched.lamda == 1.0
    for _ in range(6):
        sched.step(density=0.0)  # too sparse: down to the lower bound
    assert sched.lamda == 0.2


def test_a_lamda_outside_the_bounds_never_moves_against_the_density():
    p = torch.nn.Parameter(torch.ones(10))
    opt = bf.LinBreg([p], reg=bf.L1(5.0), backend="reference")
    sched = LamdaScheduler(opt, target_density=0.1, step=0.5, max_lamda=1.0)
    assert sched.step(density=1.0) is False and sched.lamda == 5.0  # too dense: it must not go down
    assert sched.step(density=0.0) is True and sched.lamda == 4.5  # too sparse: toward the bound


def test_a_checkpoint_of_a_scheduler_of_another_group_is_refused():
    ps = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
    opt = bf.LinBreg([{"params": [ps[0]], "reg": bf.L1(0.1), "name": "conv"},
                      {"params": [ps[1]], "reg": bf.L1(0.1), "name": "linear"}], backend="reference")
    conv = LamdaScheduler(opt, 0, target_density=0.1)
    conv.step(density=1.0)
    saved = conv.state_dict()
    assert saved["group_name"] == "conv"
    linear = LamdaScheduler(opt, 1, target_density=0.1)
    with pytest.raises(ValueError, match="steered param group 0 \\('conv'\\)"):
        linear.load_state_dict(saved)
    assert linear.calls == 0  # nothing was set
    again = LamdaScheduler(opt, 0, target_density=0.1)
    again.load_state_dict(saved)
    assert again.calls == 1
    old_format = {k: v for k, v in saved.items() if k != "group_name"}  # before the name was saved
    LamdaScheduler(opt, 0, target_density=0.1).load_state_dict(old_format)
