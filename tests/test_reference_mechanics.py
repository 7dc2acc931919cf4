"""The spec's optimizer mechanics: params without grads, in-place updates, closures, lr schedulers,
density; checkpoints; AMP; a model converted after a step."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import bregman_fused as bf

from reference_models import batches as _batches
from reference_models import small_model as _model
from reference_models import train as _train


def _params_equal(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


# ---- optimizer mechanics -------------------------------------------------------------------------
def test_params_without_grad_are_skipped():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3))
    opt = bf.AdaBreg([a, b], reg=bf.L1(0.01), backend="reference")
    a.grad = torch.randn(3)
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(b, b_before) and len(opt.state[b]) == 0 and float(opt.state[a]["step"]) == 1


def test_updates_are_in_place():
    """θ must never be replaced (p.data = ...): pointer caches and CUDA graphs rely on it."""
    a = torch.nn.Parameter(torch.randn(5, 4))
    ptr = a.data_ptr()
    opt = bf.LinBreg([a], reg=bf.GroupL1L2(0.1), momentum=0.5, backend="reference")
    state_ptrs = None
    for _ in range(3):
        a.grad = torch.randn(5, 4)
        opt.step()
        ptrs = {k: v.data_ptr() for k, v in opt.state[a].items() if k != "step"}
        state_ptrs = state_ptrs or ptrs
        assert ptrs == state_ptrs and set(ptrs) == {"dual", "momentum_buffer"}
    assert a.data_ptr() == ptr


def test_closure_is_called_and_loss_returned():
    m = _model()
    x, y = _batches(1)[0]
    opt = bf.LinBreg(m.parameters(), lr=0.1, reg=bf.L1(1e-3), backend="reference")
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss) and loss.ndim == 0


@pytest.mark.parametrize("sched", ["step", "plateau"])
def test_lr_schedulers_drive_lr(sched):
    m = _model()
    opt = bf.LinBreg(m.parameters(), lr=0.1, reg=bf.L1(1e-3), backend="reference")
    if sched == "step":
        s = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for _ in range(4):
            _train(m, opt, _batches(1))
            s.step()
        assert math.isclose(opt.param_groups[0]["lr"], 0.025)
    else:
        s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
        for _ in range(4):
            _train(m, opt, _batches(1))
            s.step(1.0)  # a flat loss: the plateau scheduler halves lr
        assert math.isclose(opt.param_groups[0]["lr"], 0.05)
    # the next step uses the scheduled lr: LinBreg moves the dual by exactly −lr·g
    p = next(m.parameters())
    dual = opt.state[p]["dual"].clone()
    for q in m.parameters():
        q.grad = torch.ones_like(q)
    opt.step()
    torch.testing.assert_close(opt.state[p]["dual"], dual - opt.param_groups[0]["lr"], rtol=0, atol=1e-7)


def test_density_and_evaluate_reg():
    a = torch.nn.Parameter(torch.tensor([1.0, 0.0, 2.0, 0.0]))
    b = torch.nn.Parameter(torch.tensor([5.0, 0.0]))  # unregularized: not part of density
    opt = bf.LinBreg([{"params": [a], "reg": bf.L1(0.5)}, {"params": [b]}], lr=0.0, backend="reference")
    assert opt.density() == 0.5  # before any step: counted directly
    a.grad, b.grad = torch.zeros(4), torch.zeros(2)
    opt.step()
    assert opt.density() == 0.5  # from the step's counts
    assert opt.evaluate_reg() == [1.5, 0.0]
    # with nothing regularized, density is over all params
    assert bf.LinBreg([b], lr=0.1).density() == 0.5


# ---- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("optim", ["linbreg", "linbreg_momentum", "adabreg", "proxsgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(optim, dtype):
    def make(m):
        groups = [{"params": [m[0].weight], "reg": bf.KernelL1L2(0.05)}, {"params": [m[2].weight], "reg": bf.L1(0.01)},
                  {"params": [p for n, p in m.named_parameters() if n.endswith("bias")] + [m[4].weight]}]
        if optim == "linbreg":
            return bf.LinBreg(groups, lr=0.1, backend="reference")
        if optim == "linbreg_momentum":
            return bf.LinBreg(groups, lr=0.1, momentum=0.9, backend="reference")
        if optim == "adabreg":
            return bf.AdaBreg(groups, lr=1e-2, backend="reference")
        return bf.ProxSGD(groups, lr=0.1, backend="reference")

    batches = _batches(8, dtype=dtype)
    full = _model(dtype=dtype)
    opt_full = make(full)
    _train(full, opt_full, batches)

    part = _model(dtype=dtype)
    opt_part = make(part)
    _train(part, opt_part, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain data only: no pickled classes

    resumed = _model(seed=123, dtype=dtype)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(ckpt["opt"])
    for p in resumed.parameters():
        for key, value in opt_resumed.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32  # fp32 states survive loading for bf16 params
    assert opt_resumed.param_groups[0]["reg"] == bf.KernelL1L2(0.05)
    _train(resumed, opt_resumed, batches[4:])
    assert _params_equal(full, resumed)
    sd_full, sd_res = opt_full.state_dict()["state"], opt_resumed.state_dict()["state"]
    for i in sd_full:
        for k in sd_full[i]:
            assert torch.equal(sd_full[i][k], sd_res[i][k]), (i, k)


def test_checkpoint_of_other_shapes_is_refused_before_loading():
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(5))
    other = bf.AdaBreg([a, b], reg=bf.L1(0.1))
    a.grad, b.grad = torch.randn(3, 4), torch.randn(5)
    other.step()
    c = torch.nn.Parameter(torch.randn(3, 4))
    d = torch.nn.Parameter(torch.randn(6))  # same count of params, other shape
    opt = bf.AdaBreg([c, d], reg=bf.L1(0.1))
    c.grad, d.grad = torch.randn(3, 4), torch.randn(6)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"'dual' of parameter 1 has shape \(5,\).*\(6,\)"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    for i in (0, 1):
        for key, value in before["state"][i].items():
            assert torch.equal(after["state"][i][key], value), (i, key)


def test_state_keys_are_the_documented_ones():
    p = torch.nn.Parameter(torch.randn(4))
    for opt, keys in [
        (bf.LinBreg([p], reg=bf.L1(0.1)), {"step", "dual"}),
        (bf.LinBreg([p], reg=bf.L1(0.1), momentum=0.5), {"step", "dual", "momentum_buffer"}),
        (bf.AdaBreg([p], reg=bf.L1(0.1)), {"step", "dual", "exp_avg", "exp_avg_sq"}),
        (bf.ProxSGD([p], reg=bf.L1(0.1)), {"step"}),
    ]:
        p.grad = torch.randn(4)
        opt.backend = "reference"
        opt.step()
        assert set(opt.state[p]) == keys


# ---- AMP -----------------------------------------------------------------------------------------
def test_found_inf_skips_everything():
    p = torch.nn.Parameter(torch.randn(6))
    opt = bf.AdaBreg([p], reg=bf.L1(0.01), backend="reference")
    p.grad = torch.randn(6)
    opt.step()
    before = copy.deepcopy(opt.state_dict()["state"])
    theta = p.detach().clone()
    opt.found_inf = torch.ones(())
    p.grad = torch.full((6,), float("inf"))
    opt.step()
    del opt.found_inf
    assert torch.equal(p, theta)
    after = opt.state_dict()["state"]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k])


def test_grad_scale_unscales():
    p1 = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = bf.AdaBreg([p1], lr=0.01, reg=bf.L1(0.01), backend="reference")
    o2 = bf.AdaBreg([p2], lr=0.01, reg=bf.L1(0.01), backend="reference")
    g = torch.randn(6, dtype=torch.float64)
    p1.grad = g * 1024
    o1.grad_scale = torch.tensor(1024.0)
    o1.found_inf = torch.zeros(())
    o1.step()
    p2.grad = g
    o2.step()
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_grad_scaler_loop():
    """torch.amp.GradScaler hands grad_scale/found_inf to the optimizer; an inf step is skipped."""
    m1, m2 = _model(), _model()
    o1 = bf.LinBreg(m1.parameters(), lr=0.1, reg=bf.L1(1e-3), backend="reference")
    o2 = bf.LinBreg(m2.parameters(), lr=0.1, reg=bf.L1(1e-3), backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for i, (x, y) in enumerate(_batches(4)):
        o1.zero_grad()
        loss = torch.nn.functional.cross_entropy(m1(x), y)
        scaler.scale(loss).backward()
        if i == 2:
            next(m1.parameters()).grad[0] = float("inf")
        scaler.step(o1)
        scaler.update()
        if i != 2:
            o2.zero_grad()
            torch.nn.functional.cross_entropy(m2(x), y).backward()
            o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert float(o1.state[next(m1.parameters())]["step"]) == 3


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_model_converted_after_a_step_is_refused_before_any_update(backend):
    """model.double() after a step leaves float32 states behind: the step refuses before it updates
    any group (the kernel's own check would only fail at that group), and reloading the optimizer's
    own state dict re-places the states."""
    from bregman_fused.backends import loader

    if backend == "cpu" and not loader.cpu_available():
        pytest.skip("C++ CPU extension unavailable")
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    opt = bf.LinBreg([{"params": a.parameters()}, {"params": b.parameters()}], lr=0.1, reg=bf.L1(0.1),
                     backend=backend)
    b(a(torch.randn(5, 4))).sum().backward()
    opt.step()
    b.double()
    for p in [*a.parameters(), *b.parameters()]:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in [*a.parameters(), *b.parameters()]]
    duals = [opt.state[p]["dual"].clone() for p in [*a.parameters(), *b.parameters()]]
    with pytest.raises(RuntimeError, match=r"param group 1 has params that are now torch.float64 .*load_state_dict"):
        opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before, [*a.parameters(), *b.parameters()]))
    assert all(torch.equal(d, opt.state[p]["dual"]) for d, p in zip(duals, [*a.parameters(), *b.parameters()]))
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert opt.state[b.weight]["dual"].dtype == torch.float64 and opt.state[a.weight]["dual"].dtype == torch.float32
