"""Triton backend: launch structure, table caches, odd sizes, long rows, mixed dtypes, AMP.

The whole-table cross-check against the reference lives in test_backends.py
(``test_triton_interpreter_matches_reference`` / ``test_triton_gpu_matches_reference``). Without a
CUDA GPU conftest.py sets TRITON_INTERPRET=1 and the kernels run in Triton's interpreter, so the
sizes here stay small.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bregman_fused as bf
from bregman_fused.backends import triton as triton_backend

from configs import backend_step

try:
    from bregman_fused.backends.triton import kernels, launcher, tables
except ImportError:  # triton not installed: every test below skips with the backend's reason
    kernels = launcher = tables = None

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
_REASON = triton_backend.unavailable_reason(torch.device(DEVICE))
needs_triton = pytest.mark.skipif(_REASON is not None, reason=f"Triton backend unavailable: {_REASON}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HYPER = {
    "linbreg": dict(lr=0.1, beta1=0.0, beta2=0.0, eps=0.0, delta=1.3),
    "linbreg_momentum": dict(lr=0.1, beta1=0.8, beta2=0.0, eps=0.0, delta=0.7),
    "adabreg": dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, delta=1.1),
    "proxsgd": dict(lr=0.1, beta1=0.0, beta2=0.0, eps=0.0, delta=1.0),
}


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Lists:
    """Params, grads and states for a direct ``step`` call (as the optimizer classes would make them)."""

    def __init__(self, opt: str, shapes, dtypes, reg, seed=0, device=DEVICE, offset=0):
        gen = torch.Generator().manual_seed(seed)
        self.kind = "linbreg" if opt.startswith("linbreg") else opt
        self.hyper = HYPER[opt]
        self.reg = reg
        if not isinstance(dtypes, (list, tuple)):
            dtypes = [dtypes] * len(shapes)
        self.params, self.grads, self.duals, self.exp_avgs, self.exp_avg_sqs, self.steps = [], [], [], [], [], []
        for shape, dtype in zip(shapes, dtypes):
            numel = int(torch.Size(shape).numel())
            theta = torch.randn(numel + offset, generator=gen, dtype=torch.float64) * 0.5
            theta[torch.rand(numel + offset, generator=gen) < 0.3] = 0
            # offset > 0: a view that starts `offset` elements into its storage (unaligned base address)
            p = theta.to(device=device, dtype=dtype)[offset:].view(shape)
            self.params.append(p)
            self.grads.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype))
            t = p.to(_state_dtype(dtype))
            self.duals.append(t / self.hyper["delta"] + reg.subgradient(t))
            if self.kind == "adabreg" or self.hyper["beta1"] > 0:
                self.exp_avgs.append(torch.randn(shape, generator=gen).abs().to(device=device, dtype=t.dtype) * 0.1)
            if self.kind == "adabreg":
                self.exp_avg_sqs.append(torch.rand(shape, generator=gen).to(device=device, dtype=t.dtype) * 0.1)
            self.steps.append(torch.zeros((), dtype=torch.float32))
        if self.kind == "proxsgd":
            self.duals = []

    def clone(self) -> "Lists":
        c = object.__new__(Lists)
        c.__dict__.update(self.__dict__)
        for key in ("params", "grads", "duals", "exp_avgs", "exp_avg_sqs", "steps"):
            setattr(c, key, [t.clone() for t in getattr(self, key)])
        return c

    def step(self, backend: str, **extra):
        return backend_step(backend, self.kind, self.params, self.grads, self.duals, self.exp_avgs, self.exp_avg_sqs, self.steps,
                  reg=self.reg, **{**self.hyper, **extra})

    def tensors(self):
        return {"params": self.params, "duals": self.duals, "exp_avgs": self.exp_avgs,
                "exp_avg_sqs": self.exp_avg_sqs, "steps": self.steps}


def _assert_same(got: Lists, ref: Lists, what=""):
    for key, tensors in got.tensors().items():
        for i, (a, b) in enumerate(zip(tensors, ref.tensors()[key])):
            torch.testing.assert_close(a.cpu(), b.cpu(), msg=lambda m: f"{what} {key}[{i}] {list(a.shape)}: {m}")


def _run_both(lists: Lists, num_steps=3, **extra):
    ref = lists.clone()
    for _ in range(num_steps):
        counts = lists.step("triton", **extra)
        ref_counts = ref.step("reference", **extra)
    _assert_same(lists, ref)
    if ref_counts is None:
        assert counts is None
    else:
        assert counts.tolist() == ref_counts.tolist()
        assert counts.tolist() == [int(torch.count_nonzero(p)) for p in lists.params]
    return lists, ref


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks and chunks so that short test tensors span several programs, full and partial
    blocks, several row tiles per entry, and rows longer than the row tile (64); 8-bit moments:
    two 256-element blocks per tile and per program, so a row's blocks span programs."""
    if not launcher.interpreting():
        pytest.skip("block sizes are only shrunk for the interpreter")
    cfg = tables.LaunchConfig(block=32, num_warps=1, row_block=64, row_num_warps=1, max_chunk=128,
                              programs_per_sm=1, code_blocks=2)
    monkeypatch.setattr(tables, "INTERPRETER_CONFIG", cfg)
    return cfg


class _CountingKernel:
    """Stands in for a @triton.jit kernel and counts the launches it forwards."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append(grid)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def count_launches(monkeypatch):
    counters = {}
    for name in ("elementwise_kernel", "row_kernel"):
        counters[name] = _CountingKernel(getattr(kernels, name))
        monkeypatch.setattr(kernels, name, counters[name])
    return counters


# ---- launches and caches ------------------------------------------------------------------------
@needs_triton
def test_one_launch_per_bucket(count_launches):
    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(5, 3), (7,), (1,), (0,), (4, 2, 3, 3)]]
    half = [torch.nn.Parameter(torch.randn(s, device=DEVICE, dtype=torch.bfloat16)) for s in [(6,), (3, 3)]]
    convs = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(4, 2, 3, 3), (3, 2, 5, 5), (2, 2, 1, 1)]]
    opt = bf.AdaBreg([{"params": dense + half, "reg": bf.L1(0.1)},
                      {"params": convs, "reg": bf.KernelL1L2(0.1)}], lr=0.01, backend="triton")
    for p in dense + half + convs:
        p.grad = torch.randn_like(p)
    for n in range(1, 3):
        opt.step()
        # buckets: (group 0, float32), (group 0, bfloat16), (group 1, float32)
        assert len(count_launches["elementwise_kernel"].launches) == 2 * n
        assert len(count_launches["row_kernel"].launches) == 1 * n
    # one program per (tensor, chunk): the empty tensor gets none
    grid = count_launches["elementwise_kernel"].launches[0]
    assert grid == (4,)


@needs_triton
def test_table_cache_reused_and_rebuilt():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(6, 5), (11,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = bf.LinBreg(params, lr=0.1, reg=bf.L1(0.2), momentum=0.5, backend="triton")
    tables.clear_caches()
    builds = tables.stats["table_builds"]
    opt.step()
    assert tables.stats["table_builds"] == builds + 1
    for _ in range(3):  # same tensors: the uploaded table is reused
        opt.step()
    assert tables.stats["table_builds"] == builds + 1
    # lr changes must not touch the tables either
    opt.param_groups[0]["lr"] = 0.05
    opt.step()
    assert tables.stats["table_builds"] == builds + 1

    # re-allocating a param (new data_ptr) builds a new table, and the kernel writes the new storage
    ref = bf.LinBreg([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.05, reg=bf.L1(0.2),
                     momentum=0.5, backend="reference")
    ref.load_state_dict(opt.state_dict())
    for p, q in zip(params, ref.param_groups[0]["params"]):
        q.grad = p.grad.clone()
    old_ptr = params[0].data_ptr()
    params[0].data = params[0].data.clone()
    assert params[0].data_ptr() != old_ptr
    opt.step()
    ref.step()
    assert tables.stats["table_builds"] == builds + 2
    for p, q in zip(params, ref.param_groups[0]["params"]):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu())

    # a new param group is a new bucket with its own table
    extra = torch.nn.Parameter(torch.randn(4, 4, device=DEVICE))
    extra.grad = torch.randn_like(extra)
    opt.add_param_group({"params": [extra], "reg": bf.L1(0.1)})
    opt.step()
    assert tables.stats["table_builds"] == builds + 3
    opt.step()
    assert tables.stats["table_builds"] == builds + 3


@needs_triton
def test_new_grad_tensors_give_correct_pointers():
    """Grads re-allocated every step (zero_grad(set_to_none=True)) must never hit a stale table."""
    lists = Lists("linbreg", [(9,), (4, 4)], torch.float32, bf.L1(0.1))
    ref = lists.clone()
    for i in range(3):
        g = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE) for p in lists.params]
        lists.grads = g
        ref.grads = [t.clone() for t in g]
        lists.step("triton")
        ref.step("reference")
        del g
    _assert_same(lists, ref)


# ---- odd sizes, many tensors, long rows ------------------------------------------------------------
SIZES = [(0,), (1,), (2,), (31,), (32,), (33,), (130,), (257,), (3, 0), (), (5, 7)]


@needs_triton
@pytest.mark.parametrize("opt", ["linbreg", "linbreg_momentum", "adabreg", "proxsgd"])
@pytest.mark.parametrize("reg", [bf.NoReg(), bf.L1(0.2), bf.L1Pos(0.2)], ids=lambda r: r.kind)
def test_many_tensors_one_bucket(opt, reg, small_blocks):
    # unaligned base addresses too (offset views): the kernel must not assume 16-byte alignment
    lists = Lists(opt, SIZES, torch.float32, reg, offset=1)
    _run_both(lists, num_steps=2)


@needs_triton
@pytest.mark.parametrize("opt", ["linbreg", "linbreg_momentum", "adabreg", "proxsgd"])
@pytest.mark.parametrize("reg", [bf.GroupL1L2(0.05), bf.SparseGroupL1L2(0.1, 0.05)], ids=lambda r: r.kind)
def test_row_kernel_all_row_classes(opt, reg, small_blocks):
    # row lengths 1 … 200 with the 64-element tile: every class (C = 1, 4, 16, 64) and long rows
    # (> 64, two sweeps), several entries per tensor (max_chunk = 128), empty tensors
    shapes = [(0,), (1,), (3,), (2, 0), (5, 1), (6, 3), (9, 4), (7, 5), (3, 16), (5, 17), (2, 64), (3, 65),
              (2, 200), (2, 3, 5, 5), (12, 9)]
    _run_both(Lists(opt, shapes, torch.float32, reg), num_steps=2)


@needs_triton
@pytest.mark.parametrize("opt", ["linbreg_momentum", "adabreg", "proxsgd"])
def test_long_rows_default_config(opt):
    """Rows longer than the default row tile take the two-sweep path."""
    block = tables.launch_config(torch.device(DEVICE)).row_block
    lists = Lists(opt, [(3, block + 477), (2, 2 * block + 1), (4, 7)], torch.float32,
                  bf.SparseGroupL1L2(0.05, 0.02))
    lists.hyper = {**lists.hyper, "lr": 0.3}
    _run_both(lists, num_steps=2)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0/0 lanes
def test_adabreg_eps_zero_rows():
    """Masked lanes of a row tile (0/0 with ε = 0) must not poison the row norms."""
    lists = Lists("adabreg", [(5, 3), (4, 7)], torch.float32, bf.GroupL1L2(0.05))
    lists.hyper = {**lists.hyper, "eps": 0.0}
    lists, _ = _run_both(lists, num_steps=2)
    assert all(torch.isfinite(p).all() for p in lists.params)


@needs_triton
def test_step_counts_differ_per_tensor():
    """Bias corrections are per tensor: a param added late has its own step count."""
    lists = Lists("adabreg", [(8,), (3, 3), (5,)], torch.float32, bf.L1(0.1))
    lists.steps[0].fill_(7)
    lists.steps[2].fill_(100)
    lists, _ = _run_both(lists, num_steps=2)
    assert [float(s) for s in lists.steps] == [9.0, 2.0, 102.0]


@needs_triton
@pytest.mark.parametrize("kind", ["linbreg", "adabreg"])
def test_host_hyper_table_follows_lr_and_step_counts(kind):
    """[note: hyper table] The host-built table is cached per setting: LinBreg's (no step-count
    column) is uploaded once per lr, AdaBreg's bias corrections are filled in every step. Both
    must follow an lr that changes between steps, as the reference does."""
    lists = Lists(kind, [(40,), (6, 7)], torch.float32, bf.L1(0.1))
    ref = lists.clone()
    tables.clear_caches()
    builds = tables.stats["hyper_builds"]
    for lr in (0.1, 0.1, 0.05, 0.1, 0.05):
        lists.step("triton", lr=lr)
        ref.step("reference", lr=lr)
        _assert_same(lists, ref, f"lr={lr}")
    assert tables.stats["hyper_builds"] == builds + 2  # one per distinct lr, whatever the step count


@needs_triton
def test_step_counts_are_read_as_the_float32_counters_hold_them():
    steps = [torch.tensor(1.0), torch.tensor(16777216.0), torch.tensor(4.0)]
    assert launcher._step_counts(steps) == [1.0, 16777216.0, 4.0]
    mixed = [torch.tensor(3.0), torch.tensor([6.0])]  # shapes a functional caller may pass
    assert launcher._step_counts(mixed) == [3.0, 6.0]


# ---- availability -----------------------------------------------------------------------------------
def test_cpu_without_interpreter_raises_clear_error():
    code = textwrap.dedent("""
        import torch, bregman_fused as bf
        from bregman_fused.backends import triton as tb
        reason = tb.unavailable_reason(torch.device("cpu"))
        assert reason is not None and "TRITON_INTERPRET=1" in reason, reason
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.randn(3)
        opt = bf.LinBreg([p], lr=0.1, backend="triton")
        try:
            opt.step()
        except RuntimeError as e:
            assert "triton" in str(e) and "TRITON_INTERPRET=1" in str(e), str(e)
            print("RAISED:", e)
        else:
            raise SystemExit("no error")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RAISED:" in out.stdout


@needs_triton
def test_interpreter_rejects_cuda_tensors():
    if not launcher.interpreting():
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    reason = triton_backend.unavailable_reason(torch.device("cuda"))
    assert reason is not None and "TRITON_INTERPRET" in reason


@needs_triton
def test_nuclear_and_bad_arguments_are_rejected():
    from bregman_fused.backends.contract import Hyper, StepTensors

    lists = Lists("linbreg", [(3, 3)], torch.float32, bf.Nuclear(0.1))
    with pytest.raises(RuntimeError, match="Nuclear"):  # refused by backends.select
        lists.step("triton")
    with pytest.raises(ValueError, match="Nuclear"):  # and by the backend itself
        triton_backend.step(StepTensors(lists.params, lists.grads, lists.duals, [], [], lists.steps),
                            Hyper.linbreg(0.1), lists.reg)
    lists = Lists("adabreg", [(3, 3)], torch.float32, bf.L1(0.1))
    lists.exp_avgs = [lists.exp_avgs[0].double()]
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]"):
        lists.step("triton")
    assert float(lists.steps[0]) == 0.0


# ---- compact moments (backends/moments.py; the whole table against the reference: test_compact_moments.py)
# lrs that are float32 values: the capturable path's lr is a float32 tensor
COMPACT_OPTS = {"adabreg": (bf.AdaBreg, dict(lr=2.0**-7, betas=(0.8, 0.95), eps=1e-6)),
                "linbreg_momentum": (bf.LinBreg, dict(lr=0.125, momentum=0.8))}


def _compact_run(kind, fmt, reg, backend, capturable, shapes, channels_last=False):
    """Four steps of an optimizer with compact moments: a skipped AMP step and a grad scale among them."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(DEVICE)) for s in shapes]
    if channels_last:  # bf16 random bits follow memory order, not the logical index
        params[-1].data = params[-1].data.to(memory_format=torch.channels_last)
    cls, hyper = COMPACT_OPTS[kind]
    lr = torch.tensor(hyper["lr"], device=DEVICE) if capturable else hyper["lr"]
    opt = cls(params, **{**hyper, "lr": lr}, reg=reg, moments=fmt, backend=backend, capturable=capturable)
    counts = []
    for k in range(4):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen).pow(4)).to(DEVICE)
            if k == 3:
                p.grad.mul_(4.0)
        if k == 1:
            opt.found_inf = torch.tensor(1.0)
        if k == 3:
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        opt.step()
        for attr in ("grad_scale", "found_inf"):
            if hasattr(opt, attr):
                delattr(opt, attr)
        counts.append(opt.density())
    return params, opt, counts


@needs_triton
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("kind", sorted(COMPACT_OPTS))
@pytest.mark.parametrize("reg", [bf.L1(0.05), bf.SparseGroupL1L2(0.05, 0.02), bf.KernelL1L2(0.05)],
                         ids=lambda r: type(r).__name__)
def test_compact_moments_many_programs_capturable_and_amp(kind, fmt, reg, small_blocks):
    """Rows of 8-bit blocks split between programs and tiles (rows of 3 blocks, the last one short;
    rows shorter than a block), kernel groups of 9 inside 256-element blocks (the block kernel then
    the row kernel),
    channels_last bf16 moments, a skipped step and a grad scale: capturable=True gives exactly the
    default path's states (step counts of the random bits read on the device), and both the
    reference's up to its tolerance (tests/test_compact_moments.py [note: compact moments tolerance])."""
    from test_compact_moments import assert_moments_match

    shapes = [(40, 3, 7, 7), (8, 64, 3, 3)]  # ≥ 4096 elements: 8-bit (rows of 147 and 576 elements)
    if not isinstance(reg, bf.KernelL1L2):
        shapes = [(37,), (9, 700)] + shapes  # a 1-D param keeps fp32 moments with "8bit"
    # channels_last conv weights are walked in memory order, where the bf16 random bits follow
    # memory; KernelL1L2's groups are not consecutive there, so kernel_views copies them to
    # row-major order and the bits would follow the copy (a known limitation, launcher.py)
    cl = fmt == "bf16" and not isinstance(reg, bf.KernelL1L2)
    got, opt, counts = _compact_run(kind, fmt, reg, "triton", False, shapes, cl)
    cap, opt_cap, counts_cap = _compact_run(kind, fmt, reg, "triton", True, shapes, cl)
    ref, opt_ref, counts_ref = _compact_run(kind, fmt, reg, "reference", False, shapes, cl)
    assert counts == counts_cap
    for i, (p, q, r) in enumerate(zip(got, cap, ref)):
        st, st_cap, st_ref = opt.state[p], opt_cap.state[q], opt_ref.state[r]
        assert torch.equal(p, q), f"param {i}"
        for key in st:
            assert torch.equal(st[key].cpu(), st_cap[key].cpu()), f"{key} of param {i}"
            if key in ("exp_avg", "exp_avg_sq", "momentum_buffer") and st[key].dtype != torch.float32:
                assert_moments_match(st[key].cpu(), st_ref[key], f"{key} of param {i}")
            else:
                torch.testing.assert_close(st[key].cpu().float(), st_ref[key].float(), rtol=1e-4, atol=1e-6,
                                           msg=f"{key} of param {i}")
        torch.testing.assert_close(p.detach().cpu(), r.detach(), rtol=1e-4, atol=1e-4)
    assert float(opt.state[got[1]]["step"]) == 3.0  # the skipped step is not counted


@needs_triton
def test_8bit_moments_launches(count_launches, monkeypatch):
    """8-bit moments: one block-kernel launch per bucket, which writes θ for the element-wise maps;
    the row maps take a row-kernel launch after it."""
    from bregman_fused.backends.triton import moment_kernels

    code = _CountingKernel(moment_kernels.code_block_kernel)
    monkeypatch.setattr(moment_kernels, "code_block_kernel", code)
    for reg, row_launches in ((bf.L1(0.1), 0), (bf.GroupL1L2(0.1), 1)):
        p = torch.nn.Parameter(torch.randn(64, 80, device=DEVICE))
        p.grad = torch.randn_like(p)
        bf.AdaBreg([p], lr=1e-3, reg=reg, moments="8bit", backend="triton").step()
        assert len(code.launches) == 1
        assert len(count_launches["row_kernel"].launches) == row_launches
        assert len(count_launches["elementwise_kernel"].launches) == 0
        code.launches.clear()


# ---- GPU only ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (compiled kernels)")
def test_changing_lr_does_not_recompile():
    lists = Lists("adabreg", [(1000,), (33, 7)], torch.float32, bf.L1(0.1), device="cuda")
    lists.step("triton")

    def compiled():
        caches = kernels.elementwise_kernel.device_caches
        return sum(len(c[0]) for c in caches.values())

    n = compiled()
    for lr in (0.01, 1.0, 0.5, 2.0):
        lists.step("triton", lr=lr)
    assert compiled() == n
