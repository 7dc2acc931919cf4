"""The fused C++ CPU backend beyond the config table: many tensors per call, mixed dtypes, strided
tensors, checkpoints across backends, AMP, the op's boundary checks and the loader's error path.

The per-config cross-check (every optimizer × regularizer × dtype × shape) is
tests/test_backends.py::test_cpu_matches_reference.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import bregman_fused as bf
from bregman_fused import backends
from bregman_fused.backends import loader

from configs import OPTIMIZERS, REGULARIZERS, backend_step, tolerance

STATE_KEYS = ("dual", "momentum_buffer", "exp_avg", "exp_avg_sq")
FUSED_REGS = ["none", "l1", "l1pos", "group", "sparse_group"]


def _need_cpu():
    if not loader.cpu_available():
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the CPU extension: {loader.cpu_error()}")
        pytest.skip(f"C++ CPU extension unavailable: {loader.cpu_error()}")


def no_ext_needed(fn):
    """Tests of the loader's error path: they run without the compiled extension."""
    fn.no_ext_needed = True
    return fn


@pytest.fixture(autouse=True)
def _cpu_ext(request):
    if not getattr(request.function, "no_ext_needed", False):
        _need_cpu()


def _inputs(shapes, num_steps, seed=0, dtypes=None, l1pos=False):
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(shapes)
    thetas, grads = [], []
    for shape, dtype in zip(shapes, dtypes):
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
        t = t.abs() if l1pos else t
        t = t.masked_fill(torch.rand(shape, generator=gen) < 0.3, 0)
        thetas.append(t.to(dtype))
        grads.append([torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(num_steps)])
    return thetas, grads


def _run(opt_name, reg_name, thetas, grads, backend, dtype=None, num_steps=None):
    """Run the optimizer on all tensors in ONE param group; return (params, optimizer)."""
    cls, hyper = OPTIMIZERS[opt_name]
    params = [torch.nn.Parameter(t.to(dtype or t.dtype).clone()) for t in thetas]
    opt = cls([{"params": params, "reg": REGULARIZERS[reg_name][0]()}], backend=backend, **hyper)
    for k in range(num_steps or len(grads[0])):
        for p, g in zip(params, grads):
            p.grad = g[k].to(p.dtype)
        opt.step()
    return params, opt


def _assert_like_reference(opt_name, reg_name, thetas, grads, num_steps=None):
    """cpu vs the reference in the same dtype, with the tolerance of configs.tolerance per tensor."""
    got_p, got_opt = _run(opt_name, reg_name, thetas, grads, "cpu", num_steps=num_steps)
    ref_p, ref_opt = _run(opt_name, reg_name, thetas, grads, "reference", num_steps=num_steps)
    r64_p, r64_opt = _run(opt_name, reg_name, thetas, grads, "reference", dtype=torch.float64, num_steps=num_steps)
    counts = got_opt._nonzeros()
    for i, (p, rp, r64) in enumerate(zip(got_p, ref_p, r64_p)):
        what = f"{opt_name}/{reg_name} tensor {i} {tuple(p.shape)} {p.dtype}"
        tol = tolerance(rp.detach(), r64.detach(), p.dtype)
        err = (p.detach().double() - r64.detach()).abs().max().item() if p.numel() else 0.0
        assert err <= tol, f"{what}: θ off by {err:.3g} > {tol:.3g}"
        st, rst, r64st = got_opt.state[p], ref_opt.state[rp], r64_opt.state[r64]
        assert set(st) == set(rst), what
        assert float(st["step"]) == float(rst["step"]), what
        for key in STATE_KEYS:
            if key in rst:
                assert st[key].dtype == rst[key].dtype, what
                tol = tolerance(rst[key], r64st[key], rst[key].dtype)
                err = (st[key].double() - r64st[key]).abs().max().item() if st[key].numel() else 0.0
                assert err <= tol, f"{what}: {key} off by {err:.3g} > {tol:.3g}"
        assert int(counts[p]) == int(torch.count_nonzero(p)), f"{what}: non-zero count"


# ---- many tensors in one call -----------------------------------------------------------------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("reg_name", FUSED_REGS)
def test_odd_sizes_in_one_group(opt_name, reg_name):
    # 0, 1, 7, 1023, 65537 elements (65537 spans three work chunks), long rows (> the kernel's row
    # scratch buffer: the two-sweep path; 10000 and 16384 would fit two or more to a work chunk,
    # each must still get its own norm) and many short rows (several row groups per chunk)
    shapes = [(0,), (1,), (7,), (1023,), (65537,), (3, 20011), (3, 10000), (2, 16384), (4099, 3), (5, 0)]
    thetas, grads = _inputs(shapes, 4, l1pos=reg_name == "l1pos")
    _assert_like_reference(opt_name, reg_name, thetas, grads)


@pytest.mark.parametrize("opt_name,reg_name", [("linbreg_momentum", "l1"), ("adabreg", "group"),
                                               ("proxsgd", "sparse_group"), ("linbreg", "l1pos")])
def test_two_thousand_tiny_tensors(opt_name, reg_name):
    # 2000 tensors of k×3 elements in one call must give exactly what one (Σk)×3 tensor gives (the
    # math is position-independent: the SIMD body and the scalar tail round identically), and
    # that tensor must match the reference
    gen = torch.Generator().manual_seed(1)
    shapes = [(int(torch.randint(1, 6, (1,), generator=gen)), 3) for _ in range(2000)]
    thetas, grads = _inputs(shapes, 2, l1pos=reg_name == "l1pos")
    many, many_opt = _run(opt_name, reg_name, thetas, grads, "cpu")
    cat_theta = [torch.cat(thetas)]
    cat_grads = [[torch.cat([g[k] for g in grads]) for k in range(2)]]
    one, one_opt = _run(opt_name, reg_name, cat_theta, cat_grads, "cpu")
    assert torch.equal(torch.cat([p.detach() for p in many]), one[0].detach())
    for key in STATE_KEYS:
        if key in one_opt.state[one[0]]:
            assert torch.equal(torch.cat([many_opt.state[p][key] for p in many]), one_opt.state[one[0]][key]), key
    assert all(float(many_opt.state[p]["step"]) == 2 for p in many)
    counts = many_opt._nonzeros()
    assert [int(counts[p]) for p in many] == [int(torch.count_nonzero(p)) for p in many]
    _assert_like_reference(opt_name, reg_name, cat_theta, cat_grads)


@pytest.mark.parametrize("kind,reg", [("linbreg", bf.L1(0.1)), ("adabreg", bf.L1(0.1)),
                                      ("adabreg", bf.GroupL1L2(1.0)), ("proxsgd", bf.SparseGroupL1L2(0.1, 0.1))])
def test_big_misaligned_bucket_vs_reference(kind, reg):
    # > 8 MiB of θ: the streaming-store path; a storage offset of one element: an unaligned start
    # (scalar peel before the aligned vector body)
    rows, n = 22_001, 100
    gen = torch.Generator().manual_seed(2)
    buf = torch.randn(rows * n + 1, generator=gen)
    buf[1:].view(rows, n)[::2] = 0  # zero rows, as in a sparse init: the thresholds keep some at 0
    hyper = dict(lr=0.05, beta1=0.0 if kind == "linbreg" else 0.8, beta2=0.95, eps=1e-6, delta=1.1)

    def make():
        theta = buf.clone()[1:].view(rows, n)
        assert theta.is_contiguous() and theta.data_ptr() % 32 != 0
        st = bf.functional.init_states(kind, [theta], reg=reg, delta=1.1)
        return [theta], st.get("duals", []), st.get("exp_avgs", []), st.get("exp_avg_sqs", []), st["steps"]

    got, ref = make(), make()
    for k in range(2):
        g = [torch.randn(rows, n, generator=torch.Generator().manual_seed(10 + k))]
        counts = backend_step("cpu", kind, got[0], g, *got[1:], reg=reg, **hyper)
        backend_step("reference", kind, ref[0], g, *ref[1:], reg=reg, **hyper)
        assert counts.tolist() == [int(torch.count_nonzero(got[0][0]))]
    for a, b in zip(got[0] + got[1] + got[2], ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert 0 < int(torch.count_nonzero(got[0][0])) < rows * n  # the threshold is active


def test_results_do_not_depend_on_thread_count():
    shapes = [(300_001,), (700, 300)]
    thetas, grads = _inputs(shapes, 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _run("adabreg", "sparse_group", thetas, grads, "cpu")
        torch.set_num_threads(max(2, before))
        many, _ = _run("adabreg", "sparse_group", thetas, grads, "cpu")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ---- strided tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_non_contiguous_params_grads_and_states(opt_name):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(12, 40, generator=gen)
    reg = bf.SparseGroupL1L2(0.1, 0.05)
    kind = "linbreg" if opt_name.startswith("linbreg") else opt_name
    hyper = dict(lr=0.1, beta1=0.8 if opt_name == "linbreg_momentum" else 0.0, beta2=0.95, eps=1e-6, delta=1.1)

    def make():
        big = base.clone()
        # a strided slice and a transposed slice of the same storage (disjoint rows 0-5 and 6-10)
        params = [big[:6, ::2][:, :5], big.t()[::3][:, 6:11]]
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(4)).t().contiguous().t()
                 for p in params]
        has_dual = kind != "proxsgd"
        duals = [(p / 1.1 + reg.subgradient(p)).t().contiguous().t() for p in params] if has_dual else []
        ms = [torch.zeros_like(p).t().contiguous().t() for p in params] if kind == "adabreg" or hyper["beta1"] else []
        ss = [torch.zeros_like(p) for p in params] if kind == "adabreg" else []
        return big, params, grads, duals, ms, ss, [torch.zeros(()) for _ in params]

    got = make()
    ref = make()
    assert not got[1][0].is_contiguous() and not got[2][0].is_contiguous()
    for _ in range(3):
        c = backend_step("cpu", kind, *got[1:], reg=reg, **hyper)
        r = backend_step("reference", kind, *ref[1:], reg=reg, **hyper)
        assert torch.equal(c, r)
    # results landed in the caller's (strided) tensors and nowhere else in the shared storage
    assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:6, ::2][:, :5] = False
    untouched.t()[::3][:, 6:11] = False
    assert torch.equal(got[0][untouched], base[untouched])
    for lst_got, lst_ref in zip(got[3:], ref[3:]):
        for a, b in zip(lst_got, lst_ref):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- AMP (the shared behaviour is in test_shared_behaviour.py) -----------------------------------
def test_op_with_found_inf_returns_current_counts():
    p = torch.tensor([0.0, 1.0, 2.0, 0.0])
    g = torch.ones(4)
    v = torch.tensor([5.0, -1.0, 0.5, 0.0])
    step = torch.zeros(())
    counts = torch.ops.bregman_fused.fused_step(0, [p], [g], [v], [], [], [], [], [step], [1], 0.1, 0.0, 0.0, 0.0, 1.0, 1,
                                                 0.25, 0.0, None, torch.ones(()))
    assert counts.tolist() == [2]
    assert p.tolist() == [0.0, 1.0, 2.0, 0.0] and v.tolist() == [5.0, -1.0, 0.5, 0.0] and float(step) == 0


def test_wrapper_reads_found_inf_once_and_the_op_only_when_it_counts(monkeypatch):
    """contract.begin_step: found_inf is read once, before any launch (on a GPU each read is a sync):
    a skipped step never reaches the op, a step that runs gives it no found_inf to read; only
    capturable=True hands it over, for the counts of the unchanged θ."""
    seen = []
    op = torch.ops.bregman_fused.fused_step

    def spy(*args):
        seen.append(args[-1])  # the op's found_inf
        return op(*args)

    monkeypatch.setattr(torch.ops.bregman_fused, "fused_step", spy)
    p = torch.tensor([0.0, 1.0, 2.0, 0.0])

    def step(flag, capturable):
        return backend_step("cpu", "linbreg", [p], [torch.ones(4)], [torch.tensor([5.0, -1.0, 0.5, 0.0])], [],
                            [], [torch.zeros(())], lr=0.1, reg=bf.L1(0.25), found_inf=torch.tensor(flag),
                            capturable=capturable)

    assert step(1.0, capturable=False) is None and seen == [] and p.tolist() == [0.0, 1.0, 2.0, 0.0]
    assert step(1.0, capturable=True).tolist() == [2] and len(seen) == 1 and float(seen[0]) == 1.0
    assert step(0.0, capturable=False).tolist() == [3] and len(seen) == 2 and seen[1] is None


# ---- boundary checks of the op ------------------------------------------------------------------
def _op_args(**over):
    p = [torch.randn(5), torch.randn(2, 3)]
    args = dict(kind=1, params=p, grads=[torch.randn_like(t) for t in p], duals=[torch.zeros_like(t) for t in p],
                exp_avgs=[torch.zeros_like(t) for t in p], exp_avg_sqs=[torch.zeros_like(t) for t in p],
                exp_avg_scales=[], exp_avg_sq_scales=[], steps=[torch.zeros(()) for _ in p], group_sizes=[1, 1], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                delta=1.0, reg=1, lamda_l1=0.1, lamda_group=0.0, grad_scale=None, found_inf=None)
    args.update(over)
    return args


def _call(args):
    return torch.ops.bregman_fused.fused_step(*args.values())


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(grads=a["grads"][:1]), "grads must hold 2 tensors (one per param), got 1"),
    (lambda a: a.update(exp_avg_sqs=[]), "exp_avg_sqs must hold 2 tensors"),
    (lambda a: a.update(kind=2), "duals must hold 0 tensors (ProxSGD has no dual variable), got 2"),
    (lambda a: a.update(group_sizes=[1]), "group_sizes must hold 2 tensors"),
    (lambda a: a["params"].__setitem__(1, torch.randn(2, 6)[:, ::2]), "params[1] must be contiguous or dense"),
    (lambda a: a["grads"].__setitem__(1, torch.randn(3, 2).t()),
     "grads[1] must have the strides of params[1] [3, 1] (walked in the same element order) or both be contiguous"),
    # a dense transposed param is walked as it is stored, so its grad must be stored alike
    (lambda a: a["params"].__setitem__(1, torch.randn(3, 2).t()),
     "grads[1] must have the strides of params[1] [1, 2]"),
    # rows of a transposed (2, 3) param are not consecutive in memory: the row maps refuse it
    (lambda a: a.update(reg=3, group_sizes=[5, 3], params=[a["params"][0], torch.randn(3, 2).t()],
                        grads=[a["grads"][0], torch.randn(3, 2).t()],
                        duals=[a["duals"][0], torch.zeros(3, 2).t()], exp_avgs=[a["exp_avgs"][0], torch.zeros(3, 2).t()],
                        exp_avg_sqs=[a["exp_avg_sqs"][0], torch.zeros(3, 2).t()]),
     "params[1] with strides [1, 2] does not hold its groups of 3 elements as consecutive memory"),
    (lambda a: a["exp_avgs"].__setitem__(0, torch.zeros(5, dtype=torch.float64)), "exp_avgs[0] must have dtype Float"),
    # grads of any param dtype are read (test_shared_behaviour.py), other dtypes are refused
    (lambda a: a["grads"].__setitem__(1, torch.zeros(2, 3, dtype=torch.int32)),
     "grads[1] must have dtype float32, float64, bfloat16 or float16 (any of them, whatever params[1]'s), got Int"),
    (lambda a: a["grads"].__setitem__(0, torch.zeros(5, dtype=torch.float8_e4m3fn)), "grads[0] must have dtype float32"),
    (lambda a: a["params"].__setitem__(1, torch.zeros(2, 3, dtype=torch.float64)), "params[1] must have dtype Float"),
    (lambda a: a["params"].__setitem__(0, torch.zeros(5, dtype=torch.int32)), "params[0] has dtype Int"),
    (lambda a: a["duals"].__setitem__(1, torch.zeros(3, 2)), "duals[1] has shape [3, 2] but params[1] has shape [2, 3]"),
    (lambda a: a["steps"].__setitem__(0, torch.zeros((), dtype=torch.float64)), "steps[0] must be a float32"),
    (lambda a: a.update(reg=3, group_sizes=[1, 4]), "group_sizes[1] = 4 must be >= 1 and divide params[1].numel() = 6"),
    (lambda a: a.update(group_sizes=[1, 3]), "group_sizes[1] must be 1 for an element-wise regularizer"),
    (lambda a: a.update(kind=7), "kind must be 0 (LinBreg), 1 (AdaBreg) or 2 (ProxSGD), got 7"),
    (lambda a: a.update(reg=9), "reg must be 0 (none)"),
    (lambda a: a.update(grad_scale=torch.ones(2)), "grad_scale must hold one element, got 2"),
    (lambda a: a.update(found_inf=torch.ones((), dtype=torch.int64)), "found_inf must be a floating-point tensor"),
])
def test_op_boundary_errors_name_the_argument(change, message):
    args = _op_args()
    change(args)
    snapshot = [t.clone() for key in ("params", "duals", "exp_avgs", "steps") for t in args[key]
                if isinstance(t, torch.Tensor)]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _call(args)
    after = [t for key in ("params", "duals", "exp_avgs", "steps") for t in args[key] if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), "a failing call must change nothing"


def test_a_failed_check_raises_instead_of_ending_the_process():
    """A failing argument check must raise. On a machine whose C++ compiler has another runtime than
    torch's it can segfault instead (README, Known pitfalls: seen with a separately built g++);
    this test names that cause, instead of the crash showing up as unrelated worker crashes."""
    code = textwrap.dedent("""
        import torch, bregman_fused as bf
        p = torch.randn(6, 4)
        try:
            bf.functional.linbreg([p], [torch.randn(4, 6)], [torch.zeros_like(p)], [], [torch.zeros(())],
                                  lr=0.1, reg=bf.L1(0.1), backend="cpu")
        except RuntimeError as e:
            print("raised:", "has shape" in str(e))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "raised: True" in r.stdout, (
        f"a failing argument check in the C++ op ended the process (exit code {r.returncode}) instead of "
        "raising: the extension was most likely built with a C++ compiler whose runtime does not match "
        "torch's; rebuild with the system compiler (README, Known pitfalls).\n" + r.stderr[-3000:])


def test_op_valid_args_run():
    # the baseline of the error table: the same arguments without the change succeed
    args = _op_args()
    counts = _call(args)
    assert counts.dtype == torch.int64 and counts.shape == (2,)
    assert all(float(s) == 1 for s in args["steps"])  # the op counts CPU step counters itself


# ---- loader: unavailable extension --------------------------------------------------------------
@no_ext_needed
def test_named_cpu_backend_raises_with_the_stored_error(monkeypatch):
    monkeypatch.setattr(loader, "_cpu", loader._LoadState(error="simulated: no C++ compiler found"))
    monkeypatch.setattr(backends, "_warned_fallback", set())
    assert not loader.cpu_available()
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = bf.LinBreg([p], reg=bf.L1(0.1), backend="cpu")
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run here.*simulated: no C\+\+ compiler found"):
        opt.step()
    with pytest.raises(RuntimeError, match="simulated: no C"):
        backend_step("cpu", "linbreg", [p], [p.grad], [p.detach().clone()], [], [], [torch.zeros(())], lr=0.1, beta1=0.0,
                      beta2=0.0, eps=0.0, delta=1.0, reg=bf.L1(0.1))
    # "auto" falls back to the reference with one warning
    auto = bf.LinBreg([p], reg=bf.L1(0.1), backend="auto")
    with pytest.warns(RuntimeWarning, match="falling back to the reference backend.*simulated"):
        auto.step()
    assert float(auto.state[p]["step"]) == 1


@no_ext_needed
def test_loader_stores_import_and_jit_errors(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "bregman_fused._C":
            raise ImportError("simulated: no compiled module")
        return real_import(name, *a, **k)

    monkeypatch.setattr(loader, "_cpu", None)
    monkeypatch.setattr(loader.importlib, "import_module", fake_import)
    monkeypatch.setenv("BREGMAN_FUSED_NO_JIT", "1")
    assert not loader.cpu_available()
    err = loader.cpu_error()
    assert "simulated: no compiled module" in err and "BREGMAN_FUSED_NO_JIT" in err
    # cached: a second query does not retry
    monkeypatch.setattr(loader.importlib, "import_module", real_import)
    assert loader.cpu_error() == err


@no_ext_needed
def test_cuda_reports_unavailable_with_a_reason():
    if loader.cuda_available():
        pytest.skip("the CUDA extension is built here")
    assert "bregman_fused._C_cuda" in loader.cuda_error()


# ---- 64-bit indexing (opt-in: needs ~13 GB of memory) -------------------------------------------
@pytest.mark.skipif(os.environ.get("BREGMAN_FUSED_BIG_TESTS") != "1",
                    reason="set BREGMAN_FUSED_BIG_TESTS=1 (needs ~13 GB of RAM)")
def test_more_than_2_pow_31_elements():
    n = 2**31 + 77
    p = torch.zeros(n, dtype=torch.bfloat16)
    g = torch.zeros(n, dtype=torch.bfloat16)
    g[-5:] = -1.0
    g[:3] = 1.0
    counts = backend_step("cpu", "proxsgd", [p], [g], [], [], [], [torch.zeros(())], lr=0.5, beta1=0.0, beta2=0.0,
                           eps=0.0, delta=1.0, reg=bf.L1(0.25))
    assert counts.tolist() == [8]
    assert p[-1].item() == 0.25 and p[0].item() == -0.25 and p[n // 2].item() == 0
