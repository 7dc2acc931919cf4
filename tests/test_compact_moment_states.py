"""Compact moments (moments="bf16" | "8bit") in the optimizers: state layout per format, bytes,
checkpoints across formats, edits of the moments key, refusals, the functional API, bucket moves.
The spec's codes and the backends against it are in tests/test_compact_moments.py."""
from __future__ import annotations

import pytest
import torch

import bregman_fused as bf
from bregman_fused.backends import moments, unavailable_reason
from bregman_fused.regularizers import NoReg


def _skip_unless_cpu(fmt: str):
    reason = unavailable_reason("cpu", torch.device("cpu"), NoReg(), fmt)
    if reason is not None:
        pytest.skip(reason)


def _adabreg_model(fmt, backend="reference"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = bf.AdaBreg(model.parameters(), lr=1e-3, reg=bf.L1(0.01), moments=fmt, backend=backend)
    return model, opt


def _steps(model, opt, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(16, 64, generator=gen)).square().mean().backward()
        opt.step()


def test_default_is_fp32_and_bit_identical():
    a, opt_a = _adabreg_model("fp32")
    torch.manual_seed(0)
    b = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt_b = bf.AdaBreg(b.parameters(), lr=1e-3, reg=bf.L1(0.01), backend="reference")
    _steps(a, opt_a)
    _steps(b, opt_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for k in opt_a.state[p]:
            assert torch.equal(opt_a.state[p][k], opt_b.state[q][k])


def test_state_layout_per_format():
    for fmt, m_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("8bit", torch.int8)):
        model, opt = _adabreg_model(fmt)
        _steps(model, opt, n=1)
        st = opt.state[model[0].weight]
        assert st["dual"].dtype == torch.float32 and st["exp_avg"].dtype == m_dtype
        assert ("exp_avg_scale" in st) == (fmt == "8bit")
        if fmt == "8bit":
            assert st["exp_avg_sq"].dtype == torch.uint8 and st["exp_avg_scale"].shape == (128, 1)
            # the bias (1-D) and the 10×128 head (1280 < 4096) keep fp32 moments, in a bucket of their own
            assert opt.state[model[0].bias]["exp_avg"].dtype == torch.float32
            assert opt.state[model[2].weight]["exp_avg"].dtype == torch.float32
            assert len(opt.backends()[0]) == 2


def test_state_bytes_per_param():
    expected = {"fp32": 12.0, "bf16": 8.0, "8bit": 6.3}
    for fmt, per_param in expected.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512, bias=False))
        opt = bf.AdaBreg(model.parameters(), lr=1e-3, moments=fmt, backend="reference")
        _steps_big(model, opt)
        report = bf.state_bytes(opt)
        n = sum(p.numel() for p in model.parameters())
        assert report["params"] == n
        if fmt == "8bit":
            assert report["per_param"] <= per_param
        else:
            assert report["per_param"] == pytest.approx(per_param, abs=0.01)


def _steps_big(model, opt):
    opt.zero_grad()
    model(torch.randn(4, 512)).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("src,dst", [("fp32", "8bit"), ("8bit", "fp32"), ("bf16", "8bit"), ("8bit", "bf16"),
                                     ("fp32", "bf16"), ("bf16", "fp32"), ("8bit", "8bit"), ("bf16", "bf16")])
def test_checkpoints_convert_between_formats(src, dst):
    model, opt = _adabreg_model(src)
    _steps(model, opt)
    sd = opt.state_dict()
    model2, opt2 = _adabreg_model(dst)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    w, w2 = model[0].weight, model2[0].weight
    st, st2 = opt.state[w], opt2.state[w2]
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.int8}[dst]
    assert st2["exp_avg"].dtype == want and ("exp_avg_scale" in st2) == (dst == "8bit")
    assert opt2.param_groups[0]["moments"] == dst
    if src == dst:  # bit for bit
        for k in st:
            assert torch.equal(st[k], st2[k]), k
    else:  # the same moments, up to the coarser format's rounding
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            a = moments.to_float(st[key], st.get(key + "_scale"), signed)
            b = moments.to_float(st2[key], st2.get(key + "_scale"), signed)
            assert torch.allclose(a, b, rtol=0.1, atol=1e-3 * a.abs().max().item()), key
    _steps(model2, opt2, n=1)  # and it steps on


def test_changing_the_moments_key_converts_at_the_next_step():
    model, opt = _adabreg_model("fp32")
    _steps(model, opt)
    m = opt.state[model[0].weight]["exp_avg"].clone()
    opt.param_groups[0]["moments"] = "8bit"
    _steps(model, opt, n=1)
    st = opt.state[model[0].weight]
    assert st["exp_avg"].dtype == torch.int8
    opt.param_groups[0]["moments"] = "fp32"
    _steps(model, opt, n=1)
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in opt.state[model[0].weight]
    assert m.abs().max() > 0


def test_bad_moments_are_refused():
    p = torch.nn.Parameter(torch.randn(64, 64))
    with pytest.raises(ValueError, match=r"Invalid moments: 'int4'.*\['fp32', 'bf16', '8bit'\]"):
        bf.AdaBreg([p], moments="int4")
    with pytest.raises(ValueError, match="float64"):
        bf.AdaBreg([torch.nn.Parameter(torch.randn(64, 64, dtype=torch.float64))], moments="8bit")
    with pytest.raises(ValueError, match="float64"):
        bf.LinBreg([torch.nn.Parameter(torch.randn(64, 64, dtype=torch.float64))], momentum=0.9, moments="bf16")
    # a group edited to a bad value is refused at the step, before anything changes
    opt = bf.AdaBreg([p], moments="8bit", backend="reference")
    p.grad = torch.randn_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    theta = p.detach().clone()
    opt.param_groups[0]["moments"] = "fp8"
    with pytest.raises(ValueError, match="Invalid moments"):
        opt.step()
    assert torch.equal(p, theta) and all(torch.equal(before[k], opt.state[p][k]) for k in before)


def test_a_checkpoint_with_broken_moments_is_refused_whole():
    model, opt = _adabreg_model("8bit")
    _steps(model, opt)
    sd = opt.state_dict()
    first = next(iter(sd["state"]))
    del sd["state"][first]["exp_avg_scale"]
    model2, opt2 = _adabreg_model("8bit")
    _steps(model2, opt2, n=1)
    before = {k: v.clone() for k, v in opt2.state[model2[0].weight].items()}
    with pytest.raises(ValueError, match="exp_avg_scale"):
        opt2.load_state_dict(sd)
    after = opt2.state[model2[0].weight]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_linbreg_momentum_buffer_formats():
    for fmt, dtype in (("bf16", torch.bfloat16), ("8bit", torch.int8)):
        torch.manual_seed(0)
        lin = torch.nn.Linear(100, 100)
        opt = bf.LinBreg(lin.parameters(), lr=0.1, momentum=0.9, reg=bf.L1(0.1), moments=fmt, backend="reference")
        lin(torch.randn(4, 100)).sum().backward()
        opt.step()
        assert opt.state[lin.weight]["momentum_buffer"].dtype == dtype
        assert ("momentum_buffer_scale" in opt.state[lin.weight]) == (fmt == "8bit")
    with pytest.warns(UserWarning, match="without momentum"):
        bf.LinBreg(torch.nn.Linear(3, 3).parameters(), moments="bf16")


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_functional_api_takes_compact_states(fmt):
    """init_states(moments=...) makes the states the classes make; a functional step equals the class's."""
    from bregman_fused import functional as F

    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(70, 65, generator=gen)
    grads = [torch.randn(70, 65, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(p0.clone())
    opt = bf.AdaBreg([p], lr=1e-2, reg=bf.L1(0.05), moments=fmt, backend="reference")
    q = p0.clone()
    states = F.init_states("adabreg", [q], reg=bf.L1(0.05), moments=fmt)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        F.adabreg([q], [g.clone()], **states, lr=1e-2, reg=bf.L1(0.05), backend="reference")
    assert torch.equal(p.detach(), q)
    assert torch.equal(opt.state[p]["exp_avg"], states["exp_avgs"][0])
    if fmt == "8bit":
        assert torch.equal(opt.state[p]["exp_avg_sq_scale"], states["exp_avg_sq_scales"][0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_param_made_channels_last_leaves_8bit_for_fp32(backend):
    """8-bit blocks follow dim-0 rows of contiguous memory: a param converted to channels_last after
    its first step moves to the fp32 bucket (its moments decoded), on every backend alike."""
    if backend == "cpu":
        _skip_unless_cpu("8bit")
    results = []
    for b in (backend, "reference"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(16, 8, 6, 6))
        opt = bf.AdaBreg([p], lr=1e-2, moments="8bit", backend=b)
        p.grad = torch.randn_like(p)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.int8
        p.data = p.data.contiguous(memory_format=torch.channels_last)
        p.grad = torch.randn_like(p).contiguous(memory_format=torch.channels_last)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in opt.state[p]
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_density_follows_the_bucket_that_ran_last():
    """A param moves between buckets when LinBreg's momentum switches (moments kept or not): the
    density is that of the step that ran last."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = bf.LinBreg([p], lr=0.5, momentum=0.9, moments="8bit", reg=bf.L1(1.0), backend="reference")
    for momentum in (0.9, 0.0, 0.9, 0.9):
        opt.param_groups[0]["momentum"] = momentum
        p.grad = torch.randn_like(p)
        opt.step()
        assert opt.density() == pytest.approx(p.detach().count_nonzero().item() / p.numel())


def test_a_moment_of_another_float_dtype_in_opt_state_is_refused_by_name():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = bf.AdaBreg([p], backend="reference")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].half()
    with pytest.raises(ValueError, match=r"state 'exp_avg' is torch.float16; expected torch.float32"):
        opt.step()


def test_proxsgd_refuses_a_moments_key():
    with pytest.raises(ValueError, match="ProxSGD has no option 'moments'"):
        bf.ProxSGD([{"params": [torch.nn.Parameter(torch.randn(3))], "moments": "8bit"}])


def test_state_bytes_counts_tensors_in_lists_once_per_storage():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = torch.optim.LBFGS([p], history_size=5)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    state = opt.state[p]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for v in state.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)}
    assert len(state["old_dirs"]) > 0
    assert bf.state_bytes(opt)["bytes"] == sum(storages.values())


def test_a_checkpoint_taken_at_momentum_zero_keeps_the_buffer_in_the_groups_format():
    """LinBreg at momentum 0 (a scheduler's choice) keeps its 8-bit buffer untouched for when momentum
    returns; a checkpoint taken then resumes the same codes, not a float32 buffer."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 300))
    uninterrupted = bf.LinBreg([p], lr=0.1, momentum=0.9, moments="8bit", backend="cpu")
    p.grad = torch.randn_like(p)
    uninterrupted.step()
    uninterrupted.param_groups[0]["momentum"] = 0.0
    uninterrupted.step()
    q = torch.nn.Parameter(p.detach().clone())
    resumed = bf.LinBreg([q], lr=0.1, momentum=0.9, moments="8bit", backend="cpu")
    resumed.load_state_dict(uninterrupted.state_dict())
    assert set(resumed.state[q]) == set(uninterrupted.state[p])
    for key, value in uninterrupted.state[p].items():
        assert resumed.state[q][key].dtype == value.dtype and torch.equal(resumed.state[q][key], value), key
    assert bf.state_bytes(resumed) == bf.state_bytes(uninterrupted)
