"""Behaviour every backend shares, run over every backend that can run here: the reference, the
C++ cpu backend, Triton (interpreter on the CPU; compiled on a GPU) and the CUDA backend on a GPU.
AMP (found_inf, grad_scale, a GradScaler loop), mixed dtypes in one group, grads in another dtype
than their param, non-zero counts of the stored θ, and checkpoints that move between backends."""
from __future__ import annotations

import io
import os

import pytest
import torch

import bregman_fused as bf
from bregman_fused.backends import unavailable_reason
from bregman_fused.backends.contract import state_dtype

from configs import OPTIMIZERS, REGULARIZERS, backend_step, tolerance

CANDIDATES = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


def _reason(backend: str, device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "set TRITON_INTERPRET=1 to run the Triton kernels on the CPU"
    if backend == "reference":
        return None
    reason = unavailable_reason(backend, torch.device(device), bf.NoReg())
    if reason is not None and backend == "cpu" and os.environ.get("CI"):
        pytest.fail(f"CI must build the CPU extension: {reason}")
    return reason


BACKENDS = [pytest.param(b, d, id=f"{b}-{d}", marks=pytest.mark.skipif(_reason(b, d) is not None,
                                                                       reason=str(_reason(b, d))))
            for b, d in CANDIDATES]


def _inputs(shapes, num_steps, seed=0, dtypes=None, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(shapes)
    thetas, grads = [], []
    for shape, dtype in zip(shapes, dtypes):
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
        t = t.masked_fill(torch.rand(shape, generator=gen) < 0.3, 0)
        thetas.append(t.to(device, dtype))
        grads.append([torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
                      for _ in range(num_steps)])
    return thetas, grads


def _run(opt_name, reg_name, thetas, grads, backend, dtype=None, num_steps=None, grad_scale=None):
    """The optimizer on all tensors in ONE param group; returns (params, optimizer)."""
    cls, hyper = OPTIMIZERS[opt_name]
    params = [torch.nn.Parameter(t.to(dtype or t.dtype).clone()) for t in thetas]
    opt = cls([{"params": params, "reg": REGULARIZERS[reg_name][0]()}], backend=backend, **hyper)
    for k in range(num_steps or len(grads[0])):
        for p, g in zip(params, grads):
            p.grad = g[k].to(p.dtype).clone()
        if grad_scale is not None:
            opt.grad_scale = grad_scale
        opt.step()
    return params, opt


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


# ---- AMP ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_found_inf_changes_nothing(backend, device, opt_name):
    thetas, grads = _inputs([(13, 7), (1023,)], 3, device=device)
    params, opt = _run(opt_name, "l1", thetas, grads, backend, num_steps=2)
    before_p, before_s = _snapshot(params, opt)
    for p, g in zip(params, grads):
        p.grad = g[2].clone()
    opt.grad_scale = torch.full((), 4.0, device=device)
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    for p, b, bs in zip(params, before_p, before_s):
        assert torch.equal(p, b)
        for k in bs:
            assert torch.equal(opt.state[p][k], bs[k]), k
        assert float(opt.state[p]["step"]) == 2
    opt.found_inf = torch.zeros((), device=device)  # a normal step
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 3
    assert not torch.equal(params[0], before_p[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
def test_functional_found_inf_returns_none_or_current_counts(backend, device, capturable):
    """A skipped step changes nothing; it returns None, or with capturable=True the counts of the
    unchanged θ (a capturable step cannot know on the host that it was skipped)."""
    p = torch.tensor([0.0, 1.0, 2.0, 0.0], device=device)
    g, v = torch.ones(4, device=device), torch.tensor([5.0, -1.0, 0.5, 0.0], device=device)
    step = torch.zeros((), device=device if capturable else "cpu")
    out = backend_step(backend, "linbreg", [p], [g], [v], [], [], [step], lr=0.1, reg=bf.L1(0.25),
                       found_inf=torch.ones((), device=device), capturable=capturable)
    assert p.tolist() == [0.0, 1.0, 2.0, 0.0] and v.tolist() == [5.0, -1.0, 0.5, 0.0] and float(step) == 0
    assert out is None if not capturable else out.tolist() == [2]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("reg_name", ["none", "group"])
def test_grad_scale_equals_pre_divided_grads(backend, device, opt_name, reg_name):
    scale = torch.full((), 3.0, device=device)  # not a power of two: the division really rounds
    thetas, grads = _inputs([(13, 7), (1023,), (4, 2, 3, 3)], 3, device=device)
    scaled = [[g * scale for g in gs] for gs in grads]
    divided = [[g / scale for g in gs] for gs in scaled]
    a, a_opt = _run(opt_name, reg_name, thetas, scaled, backend, grad_scale=scale)
    b, b_opt = _run(opt_name, reg_name, thetas, divided, backend)
    r, _ = _run(opt_name, reg_name, thetas, scaled, "reference", grad_scale=scale)
    for pa, pb, pr in zip(a, b, r):
        assert torch.equal(pa, pb)
        for key in a_opt.state[pa]:
            assert torch.equal(a_opt.state[pa][key], b_opt.state[pb][key])
        assert torch.allclose(pa, pr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_scaler_loop_skips_inf_steps(backend, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(device)
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(device)
    twin.load_state_dict(model.state_dict())
    opt = bf.AdaBreg(model.parameters(), lr=1e-2, reg=bf.L1(1e-3), backend=backend)
    twin_opt = bf.AdaBreg(twin.parameters(), lr=1e-2, reg=bf.L1(1e-3), backend=backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1000)
    x, y = torch.randn(32, 8, device=device), torch.randn(32, 2, device=device)
    inf_step = 2
    for k in range(5):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if k == inf_step:
            model[0].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            steps_before = [float(opt.state[p]["step"]) for p in model.parameters()]
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if k == inf_step:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            assert [float(opt.state[p]["step"]) for p in model.parameters()] == steps_before
            assert scaler.get_scale() == scale_before / 2
            continue
        # the twin takes the same step without a scaler (power-of-two scales: identical grads)
        twin_opt.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        twin_opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not hasattr(opt, "found_inf")  # GradScaler cleans up after itself
    assert float(opt.state[model[0].weight]["step"]) == 4


# ---- dtypes and counts --------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("reg_name", ["l1", "sparse_group"])
def test_mixed_dtypes_in_one_group(backend, device, opt_name, reg_name):
    """The optimizer buckets by dtype: one fused call per dtype, each within the reference's own
    error of a float64 run, with states in the state dtype."""
    shapes = [(37, 5), (1023,), (3, 4, 3, 3), (4, 9)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    thetas, grads = _inputs(shapes, 3, dtypes=dtypes, device=device)
    got, got_opt = _run(opt_name, reg_name, thetas, grads, backend)
    ref, _ = _run(opt_name, reg_name, thetas, grads, "reference")
    r64, _ = _run(opt_name, reg_name, thetas, grads, "reference", dtype=torch.float64)
    for p, rp, q in zip(got, ref, r64):
        assert p.dtype == rp.dtype
        tol = tolerance(rp.detach(), q.detach(), p.dtype)
        err = (p.detach().double() - q.detach()).abs().max().item()
        assert err <= tol, f"{opt_name} {p.dtype}: θ off by {err:.3g} > {tol:.3g}"
        for key, value in got_opt.state[p].items():
            if key != "step":
                assert value.dtype == state_dtype(p), key
    assert got_opt.density() == pytest.approx(sum(int(torch.count_nonzero(p)) for p in got)
                                              / sum(p.numel() for p in got))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n", [4, 37])
def test_counts_see_the_stored_dtype(backend, device, n):
    """θ = δ·v = 1e-9 rounds to 0 in float16: the count is of the stored θ (37 elements: a SIMD
    body and a scalar tail on the CPU)."""
    p = torch.zeros(n, dtype=torch.float16, device=device)
    g = torch.zeros(n, dtype=torch.float16, device=device)
    v = torch.tensor(([1e-9, 1.0, 0.0, -2e-8] * 10)[:n], device=device)
    counts = backend_step(backend, "linbreg", [p], [g], [v], [], [], [torch.zeros(())], lr=0.0, reg=bf.NoReg())
    assert p.tolist() == ([0.0, 1.0, 0.0, 0.0] * 10)[:n]
    assert counts.tolist() == [int(torch.count_nonzero(p))]


# ---- grads in another dtype than their param (mixed-precision training) ---------------------------
def _run_grad_dtypes(opt_name, reg_name, thetas, grads, backend, param_dtypes, grad_dtypes, num_steps=3):
    """The optimizer on params of ``param_dtypes`` whose grads have ``grad_dtypes``: torch's .grad
    setter refuses a grad of another dtype unless ``param.grad_dtype`` names it (torch >= 2.9)."""
    cls, hyper = OPTIMIZERS[opt_name]
    params = [torch.nn.Parameter(t.to(d).clone()) for t, d in zip(thetas, param_dtypes)]
    for p, gd in zip(params, grad_dtypes):
        p.grad_dtype = gd
    opt = cls([{"params": params, "reg": REGULARIZERS[reg_name][0]()}], backend=backend, **hyper)
    for k in range(num_steps):
        for p, g, gd in zip(params, grads, grad_dtypes):
            p.grad = g[k].to(gd)
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("reg_name", ["l1", "sparse_group"])
def test_float32_grads_of_bf16_and_fp16_params(backend, device, opt_name, reg_name):
    """Mixed-precision training keeps float32 grads of bf16/fp16 params (Tensor.grad_dtype). Every
    backend reads a grad as the reference does, grads[i].to(state dtype): params and every state
    within the reference's own error of a float64 run fed the same grad values, in one group (one
    bucket per param dtype) that also holds grads of their param's dtype."""
    shapes = [(37, 5), (1023,), (3, 4, 3, 3), (4, 9), (2, 3, 5)]
    param_dtypes = [torch.bfloat16, torch.float16, torch.bfloat16, torch.float16, torch.bfloat16]
    grad_dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    thetas, grads = _inputs(shapes, 3, device=device)
    got, got_opt = _run_grad_dtypes(opt_name, reg_name, thetas, grads, backend, param_dtypes, grad_dtypes)
    ref, ref_opt = _run_grad_dtypes(opt_name, reg_name, thetas, grads, "reference", param_dtypes, grad_dtypes)
    r64, r64_opt = _run_grad_dtypes(opt_name, reg_name, thetas, [[g.to(gd) for g in gs] for gs, gd in
                                                                  zip(grads, grad_dtypes)],
                                    "reference", [torch.float64] * len(shapes), [torch.float64] * len(shapes))
    for i, (p, rp, q) in enumerate(zip(got, ref, r64)):
        assert p.dtype == param_dtypes[i] and p.grad.dtype == grad_dtypes[i]
        tol = tolerance(rp.detach(), q.detach(), p.dtype)
        err = (p.detach().double() - q.detach()).abs().max().item()
        assert err <= tol, f"params[{i}] {p.dtype} with {grad_dtypes[i]} grads: θ off by {err:.3g} > {tol:.3g}"
        state, ref_state, r64_state = got_opt.state[p], ref_opt.state[rp], r64_opt.state[q]
        assert set(state) == set(ref_state)
        for key, value in state.items():
            if key == "step":
                assert float(value) == float(ref_state[key]) == 3
                continue
            assert value.dtype == state_dtype(p) == ref_state[key].dtype, key
            tol = tolerance(ref_state[key], r64_state[key], value.dtype)
            err = (value.double() - r64_state[key]).abs().max().item()
            assert err <= tol, f"params[{i}] {p.dtype} with {grad_dtypes[i]} grads: {key} off by {err:.3g} > {tol:.3g}"
    assert got_opt.density() == pytest.approx(sum(int(torch.count_nonzero(p)) for p in got)
                                              / sum(p.numel() for p in got))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["linbreg", "adabreg", "proxsgd"])
@pytest.mark.parametrize("reg", [bf.L1(0.25), bf.SparseGroupL1L2(0.1, 0.05)], ids=["l1", "sparse_group"])
def test_grad_dtypes_read_exactly(backend, device, kind, reg):
    """A grad is read as grads[i].to(state dtype), whichever dtype it comes in, so one call whose
    bf16 params have grads in float32, bfloat16, float16 and float64 steps exactly like the same
    params with all grads given as float32, and updates the states exactly like float32 copies of
    the params (θ one bf16 rounding apart). Rows of 9000 pass the CPU kernel's row scratch buffer
    (its two-sweep path re-reads the grads)."""
    shapes = [(37,), (13, 7), (2, 9000), (4, 2, 3, 3), (1023,), (5, 5)]
    grad_dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float64]
    gen = torch.Generator().manual_seed(5)
    thetas = [(torch.randn(s, generator=gen) * 0.5).to(device, torch.bfloat16) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(device, gd) for s, gd in zip(shapes, grad_dtypes)]
             for _ in range(3)]
    hyper = dict(lr=0.1, beta1=0.8, beta2=0.95, eps=1e-6, delta=1.1) if kind != "proxsgd" else dict(lr=0.1)
    if kind == "adabreg":
        hyper["lr"] = 0.05

    def make(dtype):
        params = [t.to(dtype).clone() for t in thetas]
        duals = [t.float() / 1.1 + reg.subgradient(t.float()) for t in thetas] if kind != "proxsgd" else []
        moments = [torch.zeros_like(t, dtype=torch.float32) for t in thetas]
        ms = moments if kind != "proxsgd" else []
        ss = [m.clone() for m in moments] if kind == "adabreg" else []
        return params, duals, ms, ss, [torch.zeros(()) for _ in thetas]

    mixed, as_float, twin = make(torch.bfloat16), make(torch.bfloat16), make(torch.float32)
    for k in range(3):
        counts = backend_step(backend, kind, mixed[0], grads[k], *mixed[1:], reg=reg, **hyper)
        float_grads = [g.float() for g in grads[k]]
        float_counts = backend_step(backend, kind, as_float[0], float_grads, *as_float[1:], reg=reg, **hyper)
        backend_step(backend, kind, twin[0], float_grads, *twin[1:], reg=reg, **hyper)
        assert torch.equal(counts, float_counts)
        assert counts.tolist() == [int(torch.count_nonzero(p)) for p in mixed[0]]
        for got, want in zip(mixed, as_float):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        for got, want in zip(mixed[1:], twin[1:]):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        for p, t in zip(mixed[0], twin[0]):  # one rounding apart (not necessarily torch's: the Triton interpreter's)
            torch.testing.assert_close(p.float(), t, rtol=torch.finfo(p.dtype).eps, atol=0)
            t.copy_(p)  # the twin goes on from the rounded θ (ProxSGD reads θ)


# ---- checkpoints move between backends ----------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opt_name", ["linbreg_momentum", "adabreg", "proxsgd"])
@pytest.mark.parametrize("direction", ["to-reference", "from-reference"])
def test_state_dict_resumes_across_backends(backend, device, opt_name, direction):
    first, second = (backend, "reference") if direction == "to-reference" else ("reference", backend)
    thetas, grads = _inputs([(13, 7), (2, 3, 3, 3), (50,)], 6, device=device)
    cls, hyper = OPTIMIZERS[opt_name]

    def make(name, init):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        return params, cls([{"params": params, "reg": bf.SparseGroupL1L2(0.1, 0.05)}], backend=name, **hyper)

    def steps(params, opt, ks):
        for k in ks:
            for p, g in zip(params, grads):
                p.grad = g[k].clone()
            opt.step()

    # uninterrupted: 3 steps on `first`, then 3 on `second` (same optimizer object)
    u_params, u_opt = make(first, thetas)
    steps(u_params, u_opt, range(3))
    u_opt.backend = second
    steps(u_params, u_opt, range(3, 6))
    # interrupted: 3 steps on `first`, checkpoint through bytes, a fresh optimizer on `second`
    a_params, a_opt = make(first, thetas)
    steps(a_params, a_opt, range(3))
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in a_params], "opt": a_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b_params, b_opt = make(second, ckpt["params"])
    b_opt.load_state_dict(ckpt["opt"])
    steps(b_params, b_opt, range(3, 6))
    for pu, pb in zip(u_params, b_params):
        assert torch.equal(pu, pb)
        su, sb = u_opt.state[pu], b_opt.state[pb]
        assert set(su) == set(sb)
        for key in su:
            assert torch.equal(su[key], sb[key]), key
    assert float(b_opt.state[b_params[0]]["step"]) == 6


# ---- edits of opt.state are never ignored ---------------------------------------------------------
def _model_and_opt(opt_name, backend, device):
    cls, hyper = OPTIMIZERS[opt_name]
    torch.manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s) * 0.5).to(device)) for s in [(6, 5), (7,)]]
    return params, cls([{"params": params, "reg": bf.L1(0.05)}], backend=backend, **hyper)


def _step(params, opt, k):
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i)).to(p.device)
    opt.step()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("edit", ["clear", "del", "replace"])
def test_edits_of_opt_state_take_effect(backend, device, opt_name, edit):
    """Resetting state as fine-tuning and pruning code does (opt.state[p].clear(), del opt.state[p],
    a replaced tensor): the next step rebuilds what is missing and updates the tensors now in
    opt.state, exactly as a fresh optimizer would; state_dict() saves what is used."""
    params, opt = _model_and_opt(opt_name, backend, device)
    ref_params, ref_opt = _model_and_opt(opt_name, "reference", device)
    for k in range(2):
        _step(params, opt, k)
        _step(ref_params, ref_opt, k)
    p, ref_p = params[0], ref_params[0]
    if edit == "clear":
        opt.state[p].clear()
        ref_opt.state[ref_p].clear()
    elif edit == "del":
        del opt.state[p]
        del ref_opt.state[ref_p]
    else:
        for o, q in ((opt, p), (ref_opt, ref_p)):
            for key, value in list(o.state[q].items()):
                o.state[q][key] = value.clone() * 0  # new tensors, zero values: a reset by replacement
    replaced = {k: v for k, v in opt.state[p].items()}
    _step(params, opt, 2)
    _step(ref_params, ref_opt, 2)
    state = opt.state[p]
    assert float(state["step"]) == 1.0  # counting restarted, with the state
    for key, value in replaced.items():
        assert state[key] is value, f"{key}: the step did not update the tensor now in opt.state"
    for key in ref_opt.state[ref_p]:
        torch.testing.assert_close(state[key].cpu(), ref_opt.state[ref_p][key].cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.detach().cpu(), ref_p.detach().cpu(), rtol=1e-5, atol=1e-6)
    saved = opt.state_dict()["state"][0]
    assert set(saved) == set(state) and all(saved[k] is state[k] for k in saved)
