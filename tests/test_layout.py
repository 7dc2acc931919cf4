"""Memory layouts: dense params (channels_last, transposed) are updated in place without copies,
their states share their layout, and checkpoints move between layouts.

Correctness in every layout against the reference is test_backends.py's table (configs.LAYOUT_SHAPES);
this file checks that the fast path is taken where it may be, and only there.
"""
from __future__ import annotations

import io
import itertools

import pytest
import torch

import bregman_fused as bf
from bregman_fused.backends import layout as _layout, loader, native
from bregman_fused.backends import unavailable_reason as _unavailable_reason
from bregman_fused.regularizers import NoReg

from configs import OPTIMIZERS, in_layout

needs_cpu_ext = pytest.mark.skipif(_unavailable_reason("cpu", torch.device("cpu"), NoReg()) is not None,
                                   reason="C++ CPU extension unavailable")


def _gpu_reason(backend: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if backend == "cuda":
        return None if loader.cuda_available() else f"CUDA extension unavailable: {loader.cuda_error()}"
    from bregman_fused.backends import triton as triton_gpu

    return triton_gpu.unavailable_reason(torch.device("cuda"))


# the fused backends that run their kernels natively here: (backend, device)
FUSED = [pytest.param("cpu", "cpu", marks=needs_cpu_ext, id="cpu")] + [
    pytest.param(b, "cuda", marks=pytest.mark.skipif(_gpu_reason(b) is not None, reason=str(_gpu_reason(b))),
                 id=f"{b}-gpu") for b in ("cuda", "triton")]


def _spy_target(backend: str):
    """The module whose ``kernel_views`` the backend calls."""
    if backend == "triton":
        from bregman_fused.backends.triton import launcher as triton_launcher

        return triton_launcher
    return native


def _conv(shape=(6, 4, 3, 3), layout="channels_last", seed=0):
    return in_layout(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), layout)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.is_contiguous()


# ---- kernel_views --------------------------------------------------------------------------------
def test_all_contiguous_inputs_are_handed_over_as_they_are():
    params, grads, states = [torch.zeros(3, 4)], [torch.ones(3, 4)], [[torch.zeros(3, 4)], []]
    out = _layout.kernel_views(params, grads, states, [1])
    assert out[0] is params and out[1] is grads and out[2] is states and out[3] == []


# group_size 36: GroupL1L2 rows of a 6×4×3×3 weight, whole blocks in channels_last memory too;
# group_size 9 in outer_transposed: KernelL1L2's 3×3 kernels stay blocks when dims 0 and 1 swap
@pytest.mark.parametrize("layout,group_size", [("channels_last", 1), ("channels_last", 36), ("transposed", 1),
                                               ("outer_transposed", 9)])
def test_dense_layouts_are_handed_over_as_they_are(layout, group_size):
    p, g, v, m = (_conv(layout=layout, seed=k) for k in range(4))
    assert not p.is_contiguous()
    (pv,), (gv,), ((vv,), (mv,), ()), writeback = _layout.kernel_views([p], [g], [[v], [m], []], [group_size])
    assert writeback == []
    # the ops walk them as flat memory in one order, the same for all (csrc/flat_layout.h)
    assert pv is p and gv is g and vv is v and mv is m


def test_partners_in_another_dense_order_get_permuted_views(monkeypatch):
    # a state made before the param went channels_last: p's order is applied to every tensor, the
    # ones that are contiguous under it are views, the others copies (written back after the step)
    monkeypatch.setattr(_layout, "_warned_state_layout", False)
    p, g = _conv(), _conv(seed=1)
    v = _conv(seed=2, layout="contiguous")
    with pytest.warns(RuntimeWarning, match="laid out differently"):
        (pv,), (gv,), ((vv,),), writeback = _layout.kernel_views([p], [g], [[v]], [1])
    assert _same_memory(pv, p) and _same_memory(gv, g) and pv.shape == gv.shape == vv.shape
    assert vv.data_ptr() != v.data_ptr() and [c for _, c in writeback] == [vv]


@pytest.mark.parametrize("case", ["kernel_rows", "transposed_rows", "strided", "grad_contiguous"])
def test_layouts_the_kernels_cannot_walk_are_copied(case):
    # kernel_rows: channels_last puts the channel between a 3×3 kernel's elements; transposed_rows:
    # reversed dims put dim 0 innermost; strided: not dense at all
    layout, group_size = {"kernel_rows": ("channels_last", 9), "transposed_rows": ("transposed", 36),
                          "strided": ("strided", 1), "grad_contiguous": ("channels_last", 1)}[case]
    p, v = _conv(layout=layout), _conv(layout=layout, seed=2)
    g = _conv(seed=1, layout="contiguous" if case == "grad_contiguous" else layout)
    before = p.clone()
    (pc,), (gc,), ((vc,),), writeback = _layout.kernel_views([p], [g], [[v]], [group_size])
    assert pc.is_contiguous() and gc.is_contiguous() and vc.is_contiguous()
    if case == "grad_contiguous":
        # only the grad is copied (read-only: nothing to copy back); θ and v are still updated in place
        assert _same_memory(pc, p) and _same_memory(vc, v) and gc.data_ptr() != g.data_ptr() and writeback == []
        assert torch.equal(gc, g.permute(0, 2, 3, 1))
        return
    assert pc.data_ptr() != p.data_ptr() and vc.data_ptr() != v.data_ptr()
    assert sorted(id(c) for _, c in writeback) == sorted([id(pc), id(vc)])  # written tensors go back, not g
    for orig, copy in writeback:  # what the backends do after the kernel
        copy.add_(1)
        orig.copy_(copy)
    assert torch.equal(p, before + 1)


def test_mismatched_lists_are_left_for_the_op_to_report():
    p = _conv()
    out_p, out_g, _, _ = _layout.kernel_views([p], [], [[]], [1])
    assert out_g == [] and out_p[0].shape == p.shape  # not permuted: the op's checks see the caller's shapes


# ---- the optimizers ------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_states_follow_the_param_layout(opt_name):
    cls, hyper = OPTIMIZERS[opt_name]
    dense = torch.nn.Parameter(_conv())
    strided = torch.nn.Parameter(_conv(layout="strided"))
    opt = cls([dense, strided], reg=bf.L1(0.1), backend="reference", **hyper)
    for p in (dense, strided):
        p.grad = torch.randn_like(p)
    opt.step()
    for key, value in opt.state[dense].items():
        if key != "step":
            assert value.stride() == dense.stride(), key
    for key, value in opt.state[strided].items():
        if key != "step":
            assert value.is_contiguous(), key


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("reg", [bf.L1(0.1), bf.GroupL1L2(0.05)], ids=["l1", "group"])
def test_fused_step_on_channels_last_copies_nothing(monkeypatch, reg, backend, device):
    seen = []
    real = _layout.kernel_views

    def spy(*args):
        out = real(*args)
        seen.append((out, p.grad))
        return out

    monkeypatch.setattr(_spy_target(backend), "kernel_views", spy)
    p = torch.nn.Parameter(_conv().to(device))
    opt = bf.AdaBreg([p], lr=1e-2, reg=reg, backend=backend)
    for k in range(3):
        p.grad = _conv(seed=10 + k).to(device)
        opt.step()
    assert len(seen) == 3
    for (params, grads, states, writeback), grad in seen:
        assert writeback == []
        assert params[0] is p and grads[0] is grad and states[0][0] is opt.state[p]["dual"]


@needs_cpu_ext
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_checkpoints_move_between_layouts_bit_for_bit(opt_name):
    """A run in channels_last, checkpointed and resumed on a contiguous model (and back), equals the
    uninterrupted contiguous run exactly: the element-wise math does not depend on the order."""
    cls, hyper = OPTIMIZERS[opt_name]
    theta0 = _conv()
    grads = [_conv(seed=20 + k) for k in range(6)]

    def run(layouts):
        p = torch.nn.Parameter(in_layout(theta0.clone(), layouts[0]))
        opt = cls([p], reg=bf.L1(0.2), backend="cpu", **hyper)
        for k, g in enumerate(grads):
            if k == 3:  # checkpoint, then a fresh model and optimizer in the second layout
                buf = io.BytesIO()
                torch.save({"theta": p.detach(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                ckpt = torch.load(buf, weights_only=True)
                p = torch.nn.Parameter(in_layout(ckpt["theta"], layouts[1]))
                opt = cls([p], reg=bf.L1(0.2), backend="cpu", **hyper)
                opt.load_state_dict(ckpt["opt"])
                for key, value in opt.state[p].items():
                    if key != "step":
                        assert value.stride() == p.stride(), key  # loaded states take the new param's layout
            p.grad = in_layout(g, layouts[1] if k >= 3 else layouts[0])
            opt.step()
        return p.detach().contiguous(), {k: v.contiguous() for k, v in opt.state[p].items()}

    want = run(("contiguous", "contiguous"))
    for layouts in (("channels_last", "contiguous"), ("contiguous", "channels_last"),
                    ("channels_last", "channels_last")):
        got = run(layouts)
        assert torch.equal(got[0], want[0]), layouts
        for key in want[1]:
            assert torch.equal(got[1][key], want[1][key]), (layouts, key)


# ---- triton: a dense layout keeps its pointers, so the pointer table is built once --------------
try:
    from bregman_fused.backends import triton as triton_backend
    from bregman_fused.backends.triton import launcher, tables
except ImportError:  # triton not installed
    launcher = tables = None

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest sets TRITON_INTERPRET=1 without a GPU
_TRITON_REASON = "triton not installed" if launcher is None else triton_backend.unavailable_reason(
    torch.device(TRITON_DEVICE))


@pytest.mark.skipif(_TRITON_REASON is not None, reason=f"Triton backend unavailable: {_TRITON_REASON}")
@pytest.mark.parametrize("reg", [bf.L1(0.2), bf.GroupL1L2(0.05)], ids=["l1", "group"])
def test_triton_channels_last_is_updated_in_place(reg):
    p = torch.nn.Parameter(_conv().to(TRITON_DEVICE))
    q = torch.nn.Parameter(_conv())
    opt = bf.AdaBreg([p], lr=1e-2, reg=reg, backend="triton")
    ref = bf.AdaBreg([q], lr=1e-2, reg=reg, backend="reference")
    p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    tables.clear_caches()
    builds = tables.stats["table_builds"]
    for k in range(3):
        g = _conv(seed=30 + k)
        p.grad.copy_(g)  # grads kept in place, as under CUDA-graph capture
        q.grad.copy_(g)
        opt.step()
        ref.step()
    # before dense views, θ and its states were copied every step: new pointers, a new table each time
    assert tables.stats["table_builds"] == builds + 1
    assert opt.state[p]["dual"].stride() == p.stride()
    torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6)
    for key in ("dual", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[p][key].cpu(), ref.state[q][key], rtol=1e-5, atol=1e-6)


@needs_cpu_ext
def test_a_partner_of_another_shape_is_reported_with_the_callers_shapes():
    p = _conv()
    grads = [torch.randn(6, 4, 9)]  # as many elements as p, another shape: never walked as a view of p
    (pv,), (gv,), _, _ = _layout.kernel_views([p], grads, [[torch.zeros_like(p)]], [1])
    assert pv.shape == p.shape and gv.shape == grads[0].shape
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[6, 4, 9\] but params\[0\] has shape \[6, 4, 3, 3\]"):
        bf.functional.linbreg([p], grads, [torch.zeros_like(p)], [], [torch.zeros(())], lr=0.1, reg=bf.L1(0.1),
                              backend="cpu")


# ---- every dense dim order of small shapes (size-1 dims included) against the reference ----------
def _in_memory_order(t: torch.Tensor, order) -> torch.Tensor:
    """A copy of t stored with dims ``order`` from outermost to innermost."""
    inverse = [order.index(d) for d in range(t.dim())]
    return t.permute(order).clone(memory_format=torch.contiguous_format).permute(inverse)


_ORDERS = [((2, 3, 1, 2), order) for order in itertools.permutations(range(4))] + \
          [((3, 1, 4), order) for order in itertools.permutations(range(3))]


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("shape,order", _ORDERS, ids=lambda x: "x".join(map(str, x)))
def test_every_dense_order_matches_the_reference(shape, order, backend, device):
    """Whatever path kernel_views takes (as stored, permuted views, copies), the fused step equals
    the reference: the kernels walk every tensor in one shared order and keep row groups whole."""
    regs = [bf.L1(0.1), bf.GroupL1L2(0.05), bf.SparseGroupL1L2(0.05, 0.05)] + ([bf.KernelL1L2(0.05)] if len(shape) >= 3 else [])
    gen = torch.Generator().manual_seed(5)
    theta0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(3)]
    for reg in regs:
        results = []
        for name, dev in ((backend, device), ("reference", "cpu")):
            p = torch.nn.Parameter(_in_memory_order(theta0.to(dev), order))
            opt = bf.AdaBreg([p], lr=0.05, reg=reg, backend=name)
            for g in grads:
                p.grad = _in_memory_order(g.to(dev), order)
                opt.step()
            assert p.stride() == _in_memory_order(theta0, order).stride()  # updated in place, layout kept
            results.append((p.detach().cpu(), {k: v.cpu() for k, v in opt.state[p].items()}))
        (got, got_state), (want, want_state) = results
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{type(reg).__name__} θ")
        for key in want_state:
            torch.testing.assert_close(got_state[key], want_state[key], rtol=1e-5, atol=1e-6,
                                       msg=f"{type(reg).__name__} {key}")


@needs_cpu_ext
@pytest.mark.parametrize("reg", [bf.L1(0.1), bf.GroupL1L2(0.05)], ids=["l1", "group"])
def test_size_one_dims_with_odd_strides_take_the_as_stored_path(monkeypatch, reg):
    """A size-1 dim holds no memory, so its stride (here the largest) must not send a dense param to
    the copy path; the op agrees (csrc/flat_layout.h ignores size-1 dims too)."""
    shape, strides = (2, 3, 1, 2), (6, 1, 12, 3)

    def odd(t):
        return torch.empty_strided(shape, strides).copy_(t)

    seen = []
    real = _layout.kernel_views
    monkeypatch.setattr(native, "kernel_views", lambda *a: seen.append(real(*a)) or seen[-1])
    gen = torch.Generator().manual_seed(7)
    theta0, grads = torch.randn(shape, generator=gen), [torch.randn(shape, generator=gen) for _ in range(3)]
    results = []
    for backend in ("cpu", "reference"):
        p = torch.nn.Parameter(odd(theta0))
        opt = bf.AdaBreg([p], lr=0.05, reg=reg, backend=backend)
        for g in grads:
            p.grad = odd(g)
            opt.step()
        assert opt.state[p]["dual"].stride() == strides
        results.append(p.detach().clone())
    assert seen and all(out[0][0] is not None and out[3] == [] for out in seen)
    assert all(out[0][0].stride() == strides for out in seen)  # handed over as stored: no view, no copy
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@needs_cpu_ext
def test_states_left_in_an_old_layout_warn_once_and_reloading_fixes_them(monkeypatch):
    monkeypatch.setattr(_layout, "_warned_state_layout", False)
    p = torch.nn.Parameter(_conv(layout="contiguous"))
    q = torch.nn.Parameter(_conv(layout="contiguous"))
    opt = bf.AdaBreg([p], lr=1e-2, reg=bf.L1(0.1), backend="cpu")
    ref = bf.AdaBreg([q], lr=1e-2, reg=bf.L1(0.1), backend="reference")
    for k in range(4):
        if k == 1:  # as model.to(memory_format=torch.channels_last) does after the first step
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        g = _conv(seed=40 + k)
        p.grad, q.grad = g.contiguous(memory_format=torch.channels_last) if k else g.clone(), g.clone()
        if k == 1:
            with pytest.warns(RuntimeWarning, match=r"opt.load_state_dict\(opt.state_dict\(\)\)"):
                opt.step()
        elif k == 2:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once per process: not again
                opt.step()
            opt.load_state_dict(opt.state_dict())
            assert all(opt.state[p][key].stride() == p.stride() for key in ("dual", "exp_avg", "exp_avg_sq"))
        else:
            opt.step()
        ref.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for key in ("dual", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-6)
