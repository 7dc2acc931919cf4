"""The spec itself: exactness against torch.optim, the proximal maps in closed form, the dual
initialisation, bad input, checkpoints, schedulers, closures and AMP."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import bregman_fused as bf

ALL_REGS = {
    "none": lambda: bf.NoReg(),
    "l1": lambda: bf.L1(0.3),
    "l1pos": lambda: bf.L1Pos(0.3),
    "group": lambda: bf.GroupL1L2(0.2),
    "kernel": lambda: bf.KernelL1L2(0.2),
    "sparse_group": lambda: bf.SparseGroupL1L2(0.1, 0.15),
    "nuclear": lambda: bf.Nuclear(0.3),
}


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)
    ).to(dtype)


def _batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def _train(model, opt, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _params_equal(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def _assert_params_close(m1, m2):
    """torch.optim's SGD and Adam fuse multiply-adds (add with alpha, lerp, addcmul) and take ATen's
    CPU sqrt, which is not correctly rounded; the spec rounds every op once (backends/rounding.py
    [note: spec roundings]). The two differ by a few ulps, which 6 training steps carry on."""
    for a, b in zip(m1.parameters(), m2.parameters()):
        eps = torch.finfo(a.dtype).eps
        torch.testing.assert_close(a, b, rtol=64 * eps, atol=64 * eps)


# ---- agreement with torch.optim ------------------------------------------------------------------
def test_linbreg_noreg_is_sgd():
    m1, m2 = _model(), _model()
    _train(m1, bf.LinBreg(m1.parameters(), lr=0.05, backend="reference"), _batches(6))
    _train(m2, torch.optim.SGD(m2.parameters(), lr=0.05, foreach=False), _batches(6))
    _assert_params_close(m1, m2)


def test_proxsgd_lamda_zero_is_sgd():
    m1, m2 = _model(), _model()
    _train(m1, bf.ProxSGD(m1.parameters(), lr=0.05, reg=bf.L1(0.0), backend="reference"), _batches(6))
    _train(m2, torch.optim.SGD(m2.parameters(), lr=0.05, foreach=False), _batches(6))
    _assert_params_close(m1, m2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adabreg_noreg_is_adam(dtype):
    m1, m2 = _model(dtype=dtype), _model(dtype=dtype)
    _train(m1, bf.AdaBreg(m1.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, backend="reference"),
           _batches(6, dtype=dtype))
    _train(m2, torch.optim.Adam(m2.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, foreach=False),
           _batches(6, dtype=dtype))
    _assert_params_close(m1, m2)


def test_linbreg_momentum_is_the_papers_form():
    """m ← β·m + (1−β)·τ·g; v ← v − m; θ = prox(δ·v), written out by hand with L1."""
    lr, beta, delta, lam = 0.1, 0.7, 0.8, 0.2
    torch.manual_seed(0)
    theta0 = torch.randn(11, 3, dtype=torch.float64)
    grads = [torch.randn(11, 3, dtype=torch.float64) for _ in range(6)]
    p = torch.nn.Parameter(theta0.clone())
    opt = bf.LinBreg([p], lr=lr, reg=bf.L1(lam), delta=delta, momentum=beta, backend="reference")
    v = theta0 / delta + lam * torch.sign(theta0)
    m = torch.zeros_like(v)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        m = beta * m + (1 - beta) * lr * g
        v = v - m
        theta = delta * torch.sign(v) * torch.clamp(v.abs() - lam, min=0)
        torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, rtol=1e-12, atol=1e-12)


def test_adabreg_is_the_design_formula():
    """AdaBreg with L1, written out from docs/design.md §1 including both bias corrections."""
    lr, b1, b2, eps, delta, lam = 0.01, 0.9, 0.999, 1e-8, 1.5, 0.05
    torch.manual_seed(3)
    theta0 = torch.randn(40, dtype=torch.float64)
    grads = [torch.randn(40, dtype=torch.float64) for _ in range(5)]
    p = torch.nn.Parameter(theta0.clone())
    opt = bf.AdaBreg([p], lr=lr, reg=bf.L1(lam), delta=delta, betas=(b1, b2), eps=eps, backend="reference")
    v = theta0 / delta + lam * torch.sign(theta0)
    m = torch.zeros_like(v)
    s = torch.zeros_like(v)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        v = v - (lr / (1 - b1**t)) * m / (s.sqrt() / math.sqrt(1 - b2**t) + eps)
        theta = delta * torch.sign(v) * torch.clamp(v.abs() - lam, min=0)
        torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-12)


# ---- proximal maps -------------------------------------------------------------------------------
def test_prox_closed_forms():
    x = torch.tensor([[3.0, -0.5, 0.2], [-2.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(bf.L1(1.0).shrink(x), torch.tensor([[2.0, 0, 0], [-1.0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(bf.L1Pos(0.5).shrink(x), torch.tensor([[2.5, 0, 0], [0, 0.5, 0]], dtype=torch.float64))
    # group: rows [3,4] (‖·‖ = 5) and [0.3, 0.4] (0.5); threshold λ√n = 1·√2
    y = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    thr = math.sqrt(2)
    expected = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64) * (1 - thr / 5)
    torch.testing.assert_close(bf.GroupL1L2(1.0).shrink(y), expected)
    # the elastic-net map is δ·shrink(v): prox_{δJ}(δ·v)
    torch.testing.assert_close(bf.GroupL1L2(1.0).prox(y, 2.0), 2.0 * expected)
    # ProxSGD scaling: prox_{tJ}
    torch.testing.assert_close(bf.L1(1.0).shrink(x, 0.5), torch.tensor([[2.5, 0, 0], [-1.5, 0.5, 0]], dtype=torch.float64))
    # sparse group: soft-threshold by λ₁ then the row shrink by λ₂√n on the result
    u = torch.tensor([[2.5, 3.5]], dtype=torch.float64)  # = soft([[3, 4]], 0.5)
    sg = bf.SparseGroupL1L2(0.5, 1.0).shrink(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(sg, u * (1 - math.sqrt(2) / u.norm()))
    # kernel groups: the kh×kw kernels of a conv weight
    w = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    w[0, 0] = 1.0  # ‖kernel‖ = 2, n = 4, threshold 0.5·2 = 1 -> factor 1/2
    w[1, 0] = 0.2  # ‖kernel‖ = 0.4 < 1 -> vanishes
    out = bf.KernelL1L2(0.5).shrink(w)
    torch.testing.assert_close(out[0, 0], torch.full((2, 2), 0.5, dtype=torch.float64))
    assert torch.count_nonzero(out[1]) == 0
    # nuclear: singular values shrunk
    d = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(bf.Nuclear(0.75).shrink(d), torch.diag(torch.tensor([2.25, 0.25, 0.0], dtype=torch.float64)))


@pytest.mark.parametrize("name", sorted(ALL_REGS))
def test_prox_is_the_minimiser(name):
    """θ = prox_{tJ}(x) beats random feasible perturbations on ½‖θ−x‖² + t·J(θ)."""
    reg = ALL_REGS[name]()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = 0.7
    theta = reg.shrink(x, t)

    def objective(z):
        return 0.5 * (z - x).pow(2).sum() + t * reg.value(z)

    best = objective(theta)
    for _ in range(50):
        z = theta + 1e-3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if name == "l1pos":
            z = z.clamp(min=0)
        assert objective(z) >= best - 1e-12


@pytest.mark.parametrize("name", sorted(ALL_REGS))
def test_subgradient_inequality(name):
    """p ∈ ∂J(θ): J(y) ≥ J(θ) + ⟨p, y − θ⟩ for all y."""
    reg = ALL_REGS[name]()
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    theta[0] = 0  # a zero row / kernels
    if name == "l1pos":
        theta = theta.abs()
    p = reg.subgradient(theta)
    for _ in range(30):
        y = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        if name == "l1pos":
            y = y.abs()
        assert reg.value(y) >= reg.value(theta) + (p * (y - theta)).sum() - 1e-10


@pytest.mark.parametrize("name", sorted(ALL_REGS))
@pytest.mark.parametrize("delta", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dual_init_reproduces_theta(name, delta, dtype):
    """v₀ = θ₀/δ + p₀ gives prox_{δJ}(δ·v₀) = θ₀: the first step starts from the user's weights."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    theta[torch.rand(theta.shape, generator=g) < 0.5] = 0
    theta[1] = 0
    if name == "l1pos":
        theta = theta.abs()
    p = torch.nn.Parameter(theta.to(dtype))
    opt = bf.LinBreg([p], lr=0.0, reg=ALL_REGS[name](), delta=delta, backend="reference")
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    opt.step()  # lr = 0: the dual does not move, θ = prox(δ·v₀)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(p.detach(), before, rtol=tol, atol=tol)
    # and a zero entry stays exactly zero (no rounding noise makes it dense)
    if name != "nuclear":
        assert torch.equal(p.detach() == 0, before == 0)


def test_group_regularizer_values():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert math.isclose(bf.GroupL1L2(2.0).value(w).item(), 2.0 * math.sqrt(2) * 6.0)
    # λ enters once (the research code squared it for the sparse-group case)
    assert math.isclose(bf.SparseGroupL1L2(0.5, 2.0).value(w).item(), 0.5 * 8.0 + 2.0 * math.sqrt(2) * 6.0)
    assert math.isclose(bf.L1(0.1).value(w).item(), 0.8)
    assert math.isclose(bf.Nuclear(1.0).value(torch.diag(torch.tensor([3.0, 1.0]))).item(), 4.0, rel_tol=1e-6)


def test_kernel_reg_rejects_linear_weight():
    with pytest.raises(ValueError, match="KernelL1L2 needs conv weights"):
        bf.LinBreg([torch.nn.Parameter(torch.randn(3, 4))], reg=bf.KernelL1L2(0.1))


# ---- bad input -----------------------------------------------------------------------------------
P = lambda: [torch.nn.Parameter(torch.randn(3))]  # noqa: E731


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: bf.LinBreg(P(), lr=-0.1), "lr"),
        (lambda: bf.LinBreg(P(), lr=float("nan")), "lr"),
        (lambda: bf.LinBreg(P(), delta=0.0), "delta"),
        (lambda: bf.LinBreg(P(), delta=-1.0), "delta"),
        (lambda: bf.LinBreg(P(), momentum=1.0), "momentum"),
        (lambda: bf.LinBreg(P(), momentum=-0.1), "momentum"),
        (lambda: bf.L1(-1e-3), "lamda"),
        (lambda: bf.SparseGroupL1L2(0.1, -1.0), "lamda_group"),
        (lambda: bf.AdaBreg(P(), betas=(1.0, 0.999)), "beta1"),
        (lambda: bf.AdaBreg(P(), betas=(0.9, -0.1)), "beta2"),
        (lambda: bf.AdaBreg(P(), eps=-1.0), "eps"),
        (lambda: bf.ProxSGD(P(), lr=-1.0), "lr"),
        (lambda: bf.LinBreg(P(), backend="gpu-magic"), "backend"),
        (lambda: bf.LinBreg([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]), "complex"),
        (lambda: bf.LinBreg(P() * 2), "same parameter twice"),
        (lambda: bf.functional.linbreg(P(), [torch.zeros(3)], [torch.zeros(3)], [], [torch.zeros(())], lr=0.1,
                                       momentum=0.9), "momentum_buffers"),
    ],
)
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_reg_type():
    with pytest.raises(TypeError, match="reg"):
        bf.LinBreg(P(), reg="l1")


def _two_group_opt():
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5))
    opt = bf.LinBreg([{"params": [a], "reg": bf.L1(0.1)}, {"params": [b]}], lr=0.1, backend="reference")
    a.grad, b.grad = torch.randn(4, 3), torch.randn(5)
    opt.step()
    return a, b, opt


@pytest.mark.parametrize("corrupt", ["lr", "lamda", "sparse_grad"])
def test_failing_step_changes_nothing(corrupt):
    a, b, opt = _two_group_opt()
    a.grad, b.grad = torch.randn(4, 3), torch.randn(5)
    if corrupt == "lr":
        opt.param_groups[1]["lr"] = -1.0  # the second group is bad: the first must not be updated either
        err, match = ValueError, "lr"
    elif corrupt == "lamda":
        opt.param_groups[0]["reg"].lamda = -0.5
        err, match = ValueError, "lamda"
    else:
        b.grad = torch.randn(5).to_sparse()
        err, match = RuntimeError, "sparse"
    before = [t.clone() for t in (a, b)]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(err, match=match):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    state_after = opt.state_dict()["state"]
    for i in state_before:
        for k in state_before[i]:
            assert torch.equal(state_before[i][k], state_after[i][k])


def test_named_backend_that_cannot_run_raises_with_reason():
    p = torch.nn.Parameter(torch.randn(3, 3))
    p.grad = torch.randn(3, 3)
    opt = bf.LinBreg([p], reg=bf.Nuclear(0.1), backend="cpu")
    with pytest.raises(RuntimeError, match="Nuclear"):
        opt.step()
    opt = bf.LinBreg([p], reg=bf.L1(0.1), backend="cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        opt.step()


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
