"""The CUDA backend beyond the shared config table (tests/test_backends.py runs that one):
CUDA vs the C++ CPU backend on parameter lists, CUDA-graph capture of fused_step_capturable,
AMP skipping (found_inf) and unscaling (grad_scale), more tensors than one launch holds, tensors
not 16-byte aligned, and a >= 2^31-element tensor. GPU tests skip with a reason without a GPU; a GPU
without a loadable CUDA extension fails (that is a broken build, not a missing device).
"""
from __future__ import annotations

import copy
import glob
import os
import subprocess

import pytest
import torch

import bregman_fused as bf

from bregman_fused.backends.contract import Kind, RegCode

from configs import OPTIMIZERS, REGULARIZERS, backend_step, tolerance
from cuda_graphs import warm_up_on_side_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_SCRIPT = os.path.join(ROOT, "tools", "check_cuda_compile.sh")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to run the CUDA kernels")

KIND = {k.label: int(k) for k in Kind}
REG_CODE = {r.name.lower(): int(r) for r in RegCode}


@pytest.fixture(scope="module")
def ops():
    from bregman_fused.backends import loader

    if not loader.cuda_available():
        pytest.fail(f"a GPU is present but the CUDA extension did not load: {loader.cuda_error()}")
    loader.cpu_available()  # the fused_step schema is defined by the CPU module
    return torch.ops.bregman_fused


# ---- CPU-only: the compile check covers every CUDA source ---------------------------------------
def test_compile_check_script_lists_every_cuda_source():
    assert os.path.isfile(CHECK_SCRIPT) and os.access(CHECK_SCRIPT, os.X_OK), "tools/check_cuda_compile.sh missing"
    out = subprocess.run([CHECK_SCRIPT, "--list"], capture_output=True, text=True, check=True, timeout=60).stdout
    listed = set(out.split())
    cu = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))}
    cpp = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))}
    assert cu, "no .cu sources under csrc/cuda"
    assert cu | cpp <= listed, f"not compiled by the check: {sorted((cu | cpp) - listed)}"
    if os.path.exists(os.path.join(ROOT, "csrc", "ops.cpp")):
        assert "csrc/ops.cpp" in listed


# ---- helpers for direct op calls -----------------------------------------------------------------
def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reg_obj(name):
    return REGULARIZERS[name][0]()


class Case:
    """One op call's tensors (params, grads, states, steps) plus hyper-parameters."""

    def __init__(self, kind, reg_name, shapes, dtype, *, momentum=False, seed=0, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.kind, self.reg_name, self.reg = kind, reg_name, _reg_obj(reg_name)
        self.dtype = dtype
        self.hyper = dict(lr=0.1, beta1=0.0, beta2=0.0, eps=0.0, delta=1.3)
        if kind == "linbreg" and momentum:
            self.hyper["beta1"] = 0.8
        if kind == "adabreg":
            self.hyper = dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, delta=1.1)
        if kind == "proxsgd":
            self.hyper["delta"] = 1.0
        sdt = _state_dtype(dtype)

        def rnd(shape, scale=1.0):
            return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

        self.params = [rnd(s, 0.5).to(dtype) for s in shapes]
        self.grads = [rnd(s).to(dtype) for s in shapes]
        self.duals = [rnd(s).to(sdt) for s in shapes] if kind != "proxsgd" else []
        self.exp_avgs = [rnd(s, 0.1).to(sdt) for s in shapes] if kind == "adabreg" or momentum else []
        self.exp_avg_sqs = [rnd(s, 0.1).abs().to(sdt) for s in shapes] if kind == "adabreg" else []
        self.steps = [torch.full((), 3.0, dtype=torch.float32) for _ in shapes]
        self.to(device)

    def lists(self):
        return [self.params, self.grads, self.duals, self.exp_avgs, self.exp_avg_sqs]

    def to(self, device, steps_device=None):
        for lst in self.lists():
            lst[:] = [t.to(device) for t in lst]
        self.steps = [t.to(steps_device or "cpu") for t in self.steps]
        return self

    def clone(self, device=None, steps_device=None, dtype=None):
        out = copy.copy(self)
        dev = device or self.params[0].device
        out.params = [t.to(device=dev, dtype=dtype or t.dtype, copy=True) for t in self.params]
        out.grads = [t.to(device=dev, dtype=dtype or t.dtype, copy=True) for t in self.grads]
        sdt = _state_dtype(dtype) if dtype is not None else None
        out.duals = [t.to(device=dev, dtype=sdt or t.dtype, copy=True) for t in self.duals]
        out.exp_avgs = [t.to(device=dev, dtype=sdt or t.dtype, copy=True) for t in self.exp_avgs]
        out.exp_avg_sqs = [t.to(device=dev, dtype=sdt or t.dtype, copy=True) for t in self.exp_avg_sqs]
        out.steps = [t.to(steps_device or t.device, copy=True) for t in self.steps]
        out.dtype = dtype or self.dtype
        return out

    def op_call(self, ops, grad_scale=None, found_inf=None):
        """The op as the package calls it: counters on the device are advanced by the caller first
        (contract.begin_step: steps += found_inf == 0), counters on the CPU by the op; the op skips
        in-kernel when found_inf is set and reports the unchanged θ's non-zeros."""
        if self.steps and self.steps[0].is_cuda:
            ran = 1.0 if found_inf is None else (found_inf.reshape(()) == 0).float()
            torch._foreach_add_(self.steps, ran)
        l1, group = self.reg.lamdas()
        sizes = [self.reg.group_size(p.shape) if p.dim() > 0 else 1 for p in self.params]
        h = self.hyper
        return ops.fused_step(KIND[self.kind], self.params, self.grads, self.duals, self.exp_avgs,
                              self.exp_avg_sqs, [], [], self.steps, sizes, h["lr"], h["beta1"], h["beta2"], h["eps"], h["delta"],
                              REG_CODE[self.reg.kind], l1, group, grad_scale, found_inf)

    def reference_call(self, grad_scale=None):
        backend_step("reference", self.kind, self.params, self.grads, self.duals, self.exp_avgs, self.exp_avg_sqs,
                     self.steps, reg=self.reg, grad_scale=grad_scale, **self.hyper)


def _assert_close_to_reference(got: Case, ref: Case, ref64: Case, what=""):
    """Every param and state within the reference's own error in that dtype (configs.tolerance)."""
    for name in ("params", "duals", "exp_avgs", "exp_avg_sqs"):
        for i, (a, r, r64) in enumerate(zip(getattr(got, name), getattr(ref, name), getattr(ref64, name))):
            a = a.cpu()
            assert a.dtype == r.dtype, f"{what} {name}[{i}] dtype {a.dtype} != {r.dtype}"
            tol = tolerance(r, r64, r.dtype)
            err = (a.double() - r64.double()).abs().max().item() if a.numel() else 0.0
            assert err <= tol, f"{what} {name}[{i}] (shape {list(a.shape)}) off by {err:.3g} > tol {tol:.3g}"
    for i, (a, r) in enumerate(zip(got.steps, ref.steps)):
        assert float(a) == float(r), f"{what} steps[{i}] = {float(a)}, reference {float(r)}"


def _run_against_reference(ops, case: Case, grad_scale_value=None):
    """Run the CUDA op on `case` (already on the GPU); compare with the reference in the case's
    dtype and in float64 on CPU copies; check the returned counts exactly."""
    ref = case.clone(device="cpu", steps_device="cpu")
    ref64 = case.clone(device="cpu", steps_device="cpu", dtype=torch.float64)
    gs = None if grad_scale_value is None else torch.tensor(grad_scale_value, device="cuda")
    counts = case.op_call(ops, grad_scale=gs)
    ref.reference_call(None if gs is None else gs.cpu())
    ref64.reference_call(None if gs is None else gs.cpu())
    _assert_close_to_reference(case, ref, ref64, f"{case.kind}/{case.reg_name}/{case.dtype}")
    assert counts.dtype == torch.int64 and counts.device.type == "cuda"
    expected = [int(torch.count_nonzero(p)) for p in case.params]
    assert counts.tolist() == expected, "non-zero counts differ from count_nonzero of the written θ"
    return counts


# ---- CUDA vs the C++ CPU backend, through the optimizer classes --------------------------------
SHAPES = [(0,), (1,), (7,), (1023,), (13, 7), (5, 37), (6, 4, 3, 3), (2, 3, 5, 5), (40, 600), (3, 2100), (70001,)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reg", ["none", "l1", "l1pos", "group", "kernel", "sparse_group"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_cuda_matches_cpu_backend(ops, optimizer, reg, dtype):
    from bregman_fused.backends import loader

    if not loader.cpu_available():
        pytest.fail(f"CUDA-vs-CPU needs the C++ CPU extension: {loader.cpu_error()}")
    shapes = [s for s in SHAPES if REGULARIZERS[reg][1](s)]
    gen = torch.Generator().manual_seed(1)
    theta0 = [(torch.randn(s, generator=gen, dtype=torch.float64) * 0.5) for s in shapes]
    if reg == "l1pos":
        theta0 = [t.abs() for t in theta0]
    theta0 = [t.masked_fill(torch.rand(t.shape, generator=gen) < 0.3, 0) for t in theta0]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(4)]

    def run(backend, device, run_dtype):
        cls, hyper = OPTIMIZERS[optimizer]
        # copy=True: a float64 CPU run would otherwise update theta0 itself, and the next run
        # would start where the previous one ended
        params = [torch.nn.Parameter(t.to(device=device, dtype=run_dtype, copy=True)) for t in theta0]
        opt = cls(params, reg=REGULARIZERS[reg][0](), backend=backend, **hyper)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(device=device, dtype=run_dtype, copy=True)
            opt.step()
        return params, opt

    cuda_p, cuda_opt = run("cuda", "cuda", dtype)
    cpu_p, cpu_opt = run("cpu", "cpu", dtype)
    ref_p, ref_opt = run("reference", "cpu", dtype)
    r64_p, r64_opt = run("reference", "cpu", torch.float64)

    counts = cuda_opt._nonzeros()
    for i, (a, b, r, r64) in enumerate(zip(cuda_p, cpu_p, ref_p, r64_p)):
        tol = tolerance(r.detach(), r64.detach(), dtype)
        err = (a.detach().cpu().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0
        # both backends lie within tol of the float64 reference, so within 2·tol of each other
        assert err <= 2 * tol, f"params[{i}] shape {list(a.shape)}: CUDA vs CPU {err:.3g} > {2 * tol:.3g}"
        assert int(counts[a]) == int(torch.count_nonzero(a)), f"params[{i}] non-zero count"
        sa, sb, sr, s64 = cuda_opt.state[a], cpu_opt.state[b], ref_opt.state[r], r64_opt.state[r64]
        assert set(sa) == set(sb), f"params[{i}] state keys {set(sa)} != {set(sb)}"
        assert float(sa["step"]) == float(sb["step"]) == len(grads)
        for key in ("dual", "momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key not in sb:
                continue
            tol = tolerance(sr[key], s64[key], sr[key].dtype)
            err = (sa[key].cpu().double() - sb[key].double()).abs().max().item() if sb[key].numel() else 0.0
            assert sa[key].dtype == sb[key].dtype
            assert err <= 2 * tol, f"params[{i}] {key}: CUDA vs CPU {err:.3g} > {2 * tol:.3g}"


# ---- AMP: found_inf skips everything, grad_scale unscales in-kernel -----------------------------
@needs_gpu
@pytest.mark.parametrize("steps_on_device", [False, True], ids=["cpu_steps", "device_steps"])
@pytest.mark.parametrize("reg", ["l1", "group"])
def test_found_inf_changes_nothing(ops, reg, steps_on_device):
    case = Case("adabreg", reg, [(5, 37), (1023,), (3, 2100)], torch.float32).to(
        "cuda", steps_device="cuda" if steps_on_device else "cpu")
    before = case.clone()
    counts = case.op_call(ops, grad_scale=torch.tensor(2.0, device="cuda"),
                          found_inf=torch.tensor(1.0, device="cuda"))
    for name in ("params", "duals", "exp_avgs", "exp_avg_sqs", "steps"):
        for i, (a, b) in enumerate(zip(getattr(case, name), getattr(before, name))):
            assert torch.equal(a, b), f"{name}[{i}] changed although found_inf was set"
    assert counts.tolist() == [int(torch.count_nonzero(p)) for p in case.params]

    # found_inf = 0: a normal step, grads divided by the scale in-kernel
    scaled = case.clone()
    for g in scaled.grads:
        g.mul_(4.0)
    _run_against_reference_with_found_inf_zero(ops, scaled, 4.0)


def _run_against_reference_with_found_inf_zero(ops, case, scale):
    ref = case.clone(device="cpu", steps_device="cpu")
    ref64 = case.clone(device="cpu", steps_device="cpu", dtype=torch.float64)
    case.op_call(ops, grad_scale=torch.tensor(scale, device="cuda"), found_inf=torch.tensor(0.0, device="cuda"))
    ref.reference_call(torch.tensor(scale))
    ref64.reference_call(torch.tensor(scale))
    _assert_close_to_reference(case, ref, ref64, "found_inf=0")


@needs_gpu
@pytest.mark.parametrize("kind,momentum", [("linbreg", False), ("linbreg", True), ("adabreg", False),
                                           ("proxsgd", False)])
@pytest.mark.parametrize("reg", ["none", "l1pos", "sparse_group"])
def test_device_steps_match_host_steps(ops, kind, momentum, reg):
    """Steps on the device (in-kernel bias corrections) give the same result as CPU steps."""
    host = Case(kind, reg, [(13, 7), (6, 4, 3, 3), (1023,)], torch.float32, momentum=momentum).to("cuda")
    dev = host.clone(steps_device="cuda")
    for _ in range(3):
        host.op_call(ops)
        dev.op_call(ops)
    for name in ("params", "duals", "exp_avgs", "exp_avg_sqs"):
        for i, (a, b) in enumerate(zip(getattr(host, name), getattr(dev, name))):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{name}[{i}]")
    assert [float(s) for s in dev.steps] == [float(s) for s in host.steps] == [6.0] * 3


# ---- launcher limits: many tensors, chunks across launches, misaligned tensors -------------------
@needs_gpu
@pytest.mark.parametrize("reg", ["l1", "group"])
def test_more_tensors_than_one_launch(ops, reg):
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 3000, (300,), generator=gen).tolist()
    shapes = [(s // 7, 7) if reg == "group" else (s,) for s in sizes]
    # tensors needing more than one launch's 320 blocks, in the middle of the list
    big = (110000, 9) if reg == "group" else (320 * 65536 + 5,)
    shapes = shapes[:150] + [big] + shapes[150:] + [big]
    case = Case("linbreg", reg, shapes, torch.float32, momentum=True).to("cuda")
    _run_against_reference(ops, case)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reg", ["l1", "sparse_group"])
def test_tensor_not_16_byte_aligned(ops, dtype, reg):
    shapes = [(5, 37), (1025,), (4, 300)]
    aligned = Case("adabreg", reg, shapes, dtype).to("cuda")
    misaligned = aligned.clone()

    def offset_by_one(t):  # same values, storage shifted by one element: a slice at offset 1
        base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = base[1:].view(t.shape)
        out.copy_(t)
        assert out.is_contiguous() and out.data_ptr() % 16 != 0
        return out

    for lst in misaligned.lists():
        lst[:] = [offset_by_one(t) for t in lst]
    c1 = aligned.op_call(ops)
    c2 = misaligned.op_call(ops)
    # the vector body and the scalar fallback call the same per-element function: bit-identical
    for name in ("params", "duals", "exp_avgs", "exp_avg_sqs"):
        for i, (a, b) in enumerate(zip(getattr(aligned, name), getattr(misaligned, name))):
            assert torch.equal(a, b), f"{name}[{i}] differs between aligned and misaligned storage"
    assert c1.tolist() == c2.tolist()
    # and both are right
    fresh = Case("adabreg", reg, shapes, dtype).to("cuda")
    for lst in fresh.lists():
        lst[:] = [offset_by_one(t) for t in lst]
    _run_against_reference(ops, fresh)


@needs_gpu
@pytest.mark.parametrize("kind", ["linbreg", "adabreg", "proxsgd"])
@pytest.mark.parametrize("reg", ["none", "l1", "group", "sparse_group"])
def test_op_matches_reference_fp32(ops, kind, reg):
    case = Case(kind, reg, [(0,), (1,), (3, 0), (13, 7), (5, 37), (40, 600), (2, 4100), (70001,)],
                torch.float32).to("cuda")
    _run_against_reference(ops, case, grad_scale_value=8.0)


@needs_gpu
def test_64bit_indexing(ops):
    """A tensor with more than 2^31 elements: the elements past 2^31 are updated and counted."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with >= 40 GiB for a 2^31-element tensor and its states")
    n = 2**31 + 4099
    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-3000:] = torch.linspace(-2, 2, 3000, device="cuda").to(torch.bfloat16)
    v = torch.zeros(n, dtype=torch.float32, device="cuda")
    steps = [torch.zeros((), dtype=torch.float32)]
    counts = ops.fused_step(0, [p], [g], [v], [], [], [], [], steps, [1], 1.0, 0.0, 0.0, 0.0, 1.0,
                                                REG_CODE["l1"], 0.5, 0.0, None, None)
    # v = −g, θ = soft_threshold(v, 0.5): every element with |g| > 0.5 is non-zero
    tail_g = g[-3000:].float().cpu()
    expected_tail = (-tail_g - (-tail_g).clamp(-0.5, 0.5)).to(torch.bfloat16)
    assert torch.equal(p[-3000:].cpu(), expected_tail)
    assert torch.equal(v[-3000:].cpu(), -tail_g)
    assert float(p[2**31 - 10]) == -0.5 and float(p[1000]) == -0.5
    assert int(counts[0]) == int(torch.count_nonzero(p))
    del p, g, v
    torch.cuda.empty_cache()


# ---- CUDA graphs: a whole training step captured with fused_step_capturable ---------------------
@needs_gpu
def test_capturable_step_in_cuda_graph(ops):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    eager_model = copy.deepcopy(model)
    group_reg = bf.GroupL1L2(lamda=0.05)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, delta=1.0)
    n_warmup, n_replay = 3, 5
    data = [(torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda")) for _ in range(n_warmup + n_replay)]
    lrs = [1e-3] * (n_warmup + 2) + [5e-4] * (n_replay - 2)  # lr changes between replays

    def make_state(m, steps_device):
        weights = [m[0].weight, m[2].weight]
        biases = [m[0].bias, m[2].bias]
        st = {}
        for name, ps, reg in (("w", weights, group_reg), ("b", biases, bf.NoReg())):
            th = [p.detach() for p in ps]
            st[name] = dict(
                params=th,
                duals=[(t / hyper["delta"] + reg.subgradient(t)).contiguous() for t in th],
                m=[torch.zeros_like(t) for t in th],
                s=[torch.zeros_like(t) for t in th],
                steps=[torch.zeros((), dtype=torch.float32, device=steps_device) for _ in th],
                sizes=[reg.group_size(t.shape) for t in th],
                reg=reg,
                grads_of=ps,
                counts=torch.zeros(len(th), dtype=torch.int64, device="cuda"),
            )
        return st

    graph_state = make_state(model, "cuda")
    eager_state = make_state(eager_model, "cpu")
    lr_t = torch.tensor(lrs[0], dtype=torch.float32, device="cuda")
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def forward_backward(m, x, y):
        for p in m.parameters():
            if p.grad is not None:
                p.grad.zero_()
        torch.nn.functional.mse_loss(m(x), y).backward()

    def capturable_step():
        forward_backward(model, static_x, static_y)
        with torch.no_grad():
            for st in graph_state.values():
                l1, group = st["reg"].lamdas()
                torch._foreach_add_(st["steps"], 1.0)  # device counters: the caller advances them
                ops.fused_step_capturable(1, st["params"], [p.grad for p in st["grads_of"]], st["duals"], st["m"],
                                          st["s"], [], [], st["steps"], st["sizes"], lr_t, hyper["beta1"], hyper["beta2"],
                                          hyper["eps"], hyper["delta"], REG_CODE[st["reg"].kind], l1, group, None,
                                          None, st["counts"])

    def eager_step(x, y, lr):
        forward_backward(eager_model, x, y)
        with torch.no_grad():
            for st in eager_state.values():
                l1, group = st["reg"].lamdas()
                st["counts"] = ops.fused_step(1, st["params"], [p.grad for p in st["grads_of"]], st["duals"], st["m"],
                                              st["s"], [], [], st["steps"], st["sizes"], lr, hyper["beta1"], hyper["beta2"],
                                              hyper["eps"], hyper["delta"], REG_CODE[st["reg"].kind], l1, group,
                                              None, None)

    # warm up on a side stream, then capture
    def warm_up(k):
        static_x.copy_(data[k][0])
        static_y.copy_(data[k][1])
        lr_t.fill_(lrs[k])
        capturable_step()

    warm_up_on_side_stream(warm_up, n_warmup)
    for k in range(n_warmup):
        eager_step(data[k][0], data[k][1], lrs[k])

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        capturable_step()
    for k in range(n_warmup, n_warmup + n_replay):
        static_x.copy_(data[k][0])
        static_y.copy_(data[k][1])
        lr_t.fill_(lrs[k])
        graph.replay()
        eager_step(data[k][0], data[k][1], lrs[k])
    torch.cuda.synchronize()

    for name in ("w", "b"):
        g_st, e_st = graph_state[name], eager_state[name]
        for key in ("params", "duals", "m", "s"):
            for i, (a, b) in enumerate(zip(g_st[key], e_st[key])):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} {key}[{i}] graph vs eager")
        assert [float(s) for s in g_st["steps"]] == [float(s) for s in e_st["steps"]] == [n_warmup + n_replay] * 2
        assert g_st["counts"].tolist() == [int(torch.count_nonzero(p)) for p in g_st["params"]]
        assert g_st["counts"].tolist() == e_st["counts"].tolist()


# ---- argument checks name the bad argument -------------------------------------------------------
@needs_gpu
def test_argument_errors_name_the_argument(ops):
    case = Case("linbreg", "l1", [(4,), (5,)], torch.float32).to("cuda")
    case.grads[1] = case.grads[1].cpu()
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be on the same device as params\[1\]"):
        case.op_call(ops)
    case = Case("adabreg", "l1", [(4,), (5,)], torch.float32).to("cuda")
    case.exp_avg_sqs[0] = case.exp_avg_sqs[0].double()
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] must have dtype Float"):
        case.op_call(ops)
    # same size, other shape: the element orders would differ (a channels_last θ walked as a view)
    case = Case("linbreg", "l1", [(4, 6)], torch.float32).to("cuda")
    case.grads[0] = case.grads[0].reshape(6, 4)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[6, 4\] but params\[0\] has shape \[4, 6\]"):
        case.op_call(ops)
    case = Case("linbreg", "group", [(4, 6)], torch.float32).to("cuda")
    with pytest.raises(RuntimeError, match=r"group_sizes\[0\] = 5"):
        ops.fused_step(0, case.params, case.grads, case.duals, [], [], [], [], case.steps, [5], 0.1, 0.0, 0.0, 0.0, 1.0,
                       REG_CODE["group"], 0.0, 0.1, None, None)
