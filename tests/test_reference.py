"""The spec itself: exactness against torch.optim, the proximal maps in closed form, the dual
initialisation and bad input (its mechanics, checkpoints and AMP: test_reference_mechanics.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import bregman_fused as bf

from reference_models import batches as _batches
from reference_models import small_model as _model
from reference_models import train as _train

ALL_REGS = {
    "none": lambda: bf.NoReg(),
    "l1": lambda: bf.L1(0.3),
    "l1pos": lambda: bf.L1Pos(0.3),
    "group": lambda: bf.GroupL1L2(0.2),
    "kernel": lambda: bf.KernelL1L2(0.2),
    "sparse_group": lambda: bf.SparseGroupL1L2(0.1, 0.15),
    "nuclear": lambda: bf.Nuclear(0.3),
}


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
