"""capturable=True: step counters on the params' device, a tensor lr, no host read on the GPU backends.

On the CPU (every CI run) the capturable code paths of the reference, the cpu backend and the
Triton launcher (interpreter) are checked against the default path: same values, same states, a
skipped AMP step that changes nothing and still reports the counts. On a GPU, a whole training step
is captured in a CUDA graph and replayed against eager steps.
"""
from __future__ import annotations

import copy

import pytest
import torch

import bregman_fused as bf
from bregman_fused import functional
from bregman_fused.backends import loader
from bregman_fused.backends import triton as triton_backend

from cuda_graphs import warm_up_on_side_stream

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")

OPTIMIZERS = {
    "linbreg": (bf.LinBreg, dict(delta=1.3)),
    "linbreg_momentum": (bf.LinBreg, dict(delta=0.7, momentum=0.8)),
    "adabreg": (bf.AdaBreg, dict(delta=1.1, betas=(0.8, 0.95), eps=1e-6)),
    "proxsgd": (bf.ProxSGD, {}),
}
LRS = {"linbreg": [0.1, 0.1, 0.05, 0.2], "linbreg_momentum": [0.1, 0.3, 0.05, 0.1],
       "adabreg": [0.05, 0.02, 0.05, 0.1], "proxsgd": [0.1, 0.05, 0.05, 0.2]}
REGS = {"l1": lambda: bf.L1(lamda=0.25), "group": lambda: bf.GroupL1L2(lamda=0.08),
        "sparse_group": lambda: bf.SparseGroupL1L2(lamda_l1=0.1, lamda_group=0.05)}
SHAPES = [(13, 7), (5, 37), (1,), (2, 3, 5, 5)]


def _cpu_backends():
    out = ["reference"]
    if loader.cpu_available():
        out.append("cpu")
    if triton_backend.unavailable_reason("cpu") is None:
        out.append("triton")
    return out


def _make(kind, backend, reg, capturable, device="cpu", lr=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(device)) for s in SHAPES]
    cls, hyper = OPTIMIZERS[kind]
    lr = LRS[kind][0] if lr is None else lr
    return params, cls(params, lr=lr, reg=reg, backend=backend, capturable=capturable, **hyper)


def _set_grads(params, k, device="cpu"):
    gen = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)


def _states(opt, params):
    return [{k: v.detach().cpu().clone() for k, v in opt.state[p].items()} for p in params]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("reg", sorted(REGS))
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_capturable_matches_the_default_path(kind, reg, backend):
    """A tensor lr changed in place, a skipped AMP step and a grad scale: capturable=True gives the
    same parameters, states and densities as capturable=False with a float lr."""
    lrs = LRS[kind]
    p_def, opt_def = _make(kind, backend, REGS[reg](), capturable=False)
    lr_t = torch.tensor(lrs[0])
    p_cap, opt_cap = _make(kind, backend, REGS[reg](), capturable=True, lr=lr_t)
    scale = torch.tensor(4.0)
    for k, lr in enumerate(lrs + [lrs[-1]]):
        opt_def.param_groups[0]["lr"] = lr
        lr_t.fill_(lr)
        skip = k == 2
        for params, opt in ((p_def, opt_def), (p_cap, opt_cap)):
            _set_grads(params, k)
            if k >= 3:  # GradScaler's hand-over: scaled grads, the scale and the overflow flag
                for p in params:
                    p.grad.mul_(scale)
                opt.grad_scale, opt.found_inf = scale, torch.tensor(0.0)
            if skip:
                opt.found_inf = torch.tensor(1.0)
            before = [p.detach().clone() for p in params]
            opt.step()
            for attr in ("grad_scale", "found_inf"):
                if hasattr(opt, attr):
                    delattr(opt, attr)
            if skip:
                assert all(torch.equal(b, p) for b, p in zip(before, params)), "a skipped step changed θ"
        for a, b in zip(p_def, p_cap):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        for sa, sb in zip(_states(opt_def, p_def), _states(opt_cap, p_cap)):
            assert sa.keys() == sb.keys()
            for key in sa:
                torch.testing.assert_close(sb[key], sa[key], rtol=1e-6, atol=1e-7, msg=f"state {key!r}, step {k}")
        assert opt_cap.density() == opt_def.density()
    assert all(float(opt_cap.state[p]["step"]) == len(lrs) for p in p_cap)  # the skipped step is not counted


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("reg", ["l1", "group"])
def test_capturable_backend_returns_counts_after_a_skipped_step(backend, reg):
    """The backend contract with capturable=True: the counts of the unchanged θ, never None (the GPU
    backends cannot know without a host read that found_inf was set); the default returns None."""
    r = REGS[reg]()
    params = [(torch.randn(s) * 0.5) for s in SHAPES]
    params[0][0] = 0.0
    for capturable in (False, True):
        ps = [p.clone() for p in params]
        states = functional.init_states("adabreg", ps, reg=r, capturable=capturable)
        out = functional.adabreg(ps, [torch.randn_like(p) for p in ps], **states, lr=torch.tensor(0.01),
                                 reg=r, backend=backend, found_inf=torch.tensor(1.0), capturable=capturable)
        assert all(torch.equal(a, b) for a, b in zip(ps, params))
        assert all(float(t) == 0.0 for t in states["steps"])
        if capturable:
            assert out.tolist() == [int(torch.count_nonzero(p)) for p in params]
        else:
            assert out is None


@pytest.mark.parametrize("backend", _cpu_backends())
def test_checkpoints_move_between_capturable_and_default(backend):
    """The state layout does not depend on capturable: a checkpoint of either kind resumes in the
    other bit for bit; the step counters follow the loading group's placement."""
    torch.manual_seed(0)
    for src_cap, dst_cap in ((True, False), (False, True)):
        p_src, opt_src = _make("adabreg", backend, bf.L1(lamda=0.25), capturable=src_cap)
        for k in range(3):
            _set_grads(p_src, k)
            opt_src.step()
        sd = copy.deepcopy(opt_src.state_dict())
        p_dst, opt_dst = _make("adabreg", backend, bf.L1(lamda=0.25), capturable=dst_cap)
        with torch.no_grad():
            for a, b in zip(p_dst, p_src):
                a.copy_(b)
        opt_dst.load_state_dict(sd)
        assert opt_dst.param_groups[0]["capturable"] is src_cap  # a saved group keeps its setting
        for k in range(3, 5):
            for params, opt in ((p_src, opt_src), (p_dst, opt_dst)):
                _set_grads(params, k)
                opt.step()
        for a, b in zip(p_src, p_dst):
            assert torch.equal(a, b)


def test_old_checkpoint_without_capturable_key_loads():
    p, opt = _make("linbreg", "reference", bf.L1(lamda=0.25), capturable=False)
    _set_grads(p, 0)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["capturable"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["capturable"] is False
    _set_grads(p, 1)
    opt.step()


def test_switching_capturable_on_moves_the_step_counters():
    p, opt = _make("adabreg", "reference", bf.L1(lamda=0.25), capturable=False)
    _set_grads(p, 0)
    opt.step()
    opt.param_groups[0]["capturable"] = True
    _set_grads(p, 1)
    opt.step()
    assert all(float(opt.state[q]["step"]) == 2.0 for q in p)


def test_lr_and_capturable_argument_errors():
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="lr"):
        bf.AdaBreg([w], lr=torch.tensor([1e-3, 1e-3]), capturable=True)
    with pytest.raises(ValueError, match="lr"):
        bf.AdaBreg([w], lr=torch.tensor(-1e-3), capturable=True)
    with pytest.raises(ValueError, match="lr"):
        bf.LinBreg([w], lr=torch.tensor(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="lr"):  # the cuda kernels read float32/float64 only
        bf.LinBreg([w], lr=torch.tensor(0.1, dtype=torch.bfloat16), capturable=True)
    with pytest.raises(TypeError, match="capturable"):
        bf.LinBreg([w], lr=0.1, capturable="yes")
    opt = bf.AdaBreg([w], lr=torch.tensor(1e-3), capturable=True, backend="reference")
    opt.param_groups[0]["lr"].fill_(float("nan"))
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="lr"):  # a CPU lr is read at every step: no sync to avoid
        opt.step()
    assert torch.equal(w, before)


@pytest.mark.skipif(triton_backend.unavailable_reason("cpu") is not None, reason="Triton interpreter not active")
def test_triton_capturable_checks_the_step_counters():
    p = [torch.randn(5)]
    with pytest.raises(ValueError, match=r"steps\[0\]"):
        functional.linbreg(p, [torch.randn(5)], [p[0].clone()], [], [torch.zeros(2)], lr=0.1, backend="triton",
                           capturable=True)


# ---- on a GPU: a whole training step in a CUDA graph -------------------------------------------------
def _gpu_backends():
    out = []
    if torch.cuda.is_available():
        if loader.cuda_available():
            out.append("cuda")
        if triton_backend.unavailable_reason("cuda") is None:
            out.append("triton")
    return out or ["cuda"]


@needs_gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("kind,reg", [("adabreg", "l1"), ("adabreg", "group"), ("linbreg_momentum", "l1"),
                                      ("proxsgd", "sparse_group")])
def test_training_step_replayed_from_a_cuda_graph(backend, kind, reg):
    """Forward, backward and optimizer.step() captured once and replayed; the lr tensor and the AMP
    overflow flag change between replays. Matches eager steps of a non-capturable twin."""
    if backend == "cuda" and not loader.cuda_available():
        pytest.skip(f"CUDA extension not built: {loader.cuda_error()}")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(dev)
    twin = copy.deepcopy(model)
    cls, hyper = OPTIMIZERS[kind]
    lrs = LRS[kind] * 2
    lr_t = torch.tensor(lrs[0], device=dev)
    opt = cls(model.parameters(), lr=lr_t, reg=REGS[reg](), backend=backend, capturable=True, **hyper)
    eager = cls(twin.parameters(), lr=lrs[0], reg=REGS[reg](), backend=backend, **hyper)
    found_inf = torch.zeros((), device=dev)
    opt.found_inf = found_inf  # kept as an attribute: the captured step reads the tensor at replay
    n_warmup = 3
    data = [(torch.randn(16, 32, device=dev), torch.randn(16, 8, device=dev)) for _ in range(n_warmup + len(lrs))]
    skipped = {n_warmup + 2}
    x_static, y_static = data[0][0].clone(), data[0][1].clone()

    def train_step(m, o, x, y):
        o.zero_grad(set_to_none=False)  # triton: grads stay where warm-up saw them
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    def warm_up(k):
        x_static.copy_(data[k][0])
        y_static.copy_(data[k][1])
        train_step(model, opt, x_static, y_static)

    warm_up_on_side_stream(warm_up, n_warmup)
    for k in range(n_warmup):
        train_step(twin, eager, *data[k])

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, x_static, y_static)
    for j, k in enumerate(range(n_warmup, n_warmup + len(lrs))):
        x_static.copy_(data[k][0])
        y_static.copy_(data[k][1])
        lr_t.fill_(lrs[j])
        found_inf.fill_(1.0 if k in skipped else 0.0)
        graph.replay()
        eager.param_groups[0]["lr"] = lrs[j]
        eager.found_inf = torch.tensor(1.0 if k in skipped else 0.0, device=dev)
        train_step(twin, eager, *data[k])
        del eager.found_inf
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(model.parameters(), twin.parameters()):
        for key, value in eager.state[b].items():
            torch.testing.assert_close(opt.state[a][key].cpu(), value.cpu(), rtol=1e-5, atol=1e-6, msg=key)
    assert opt.density() == pytest.approx(eager.density())


@needs_gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_lr_on_another_device_is_refused_before_any_update(backend):
    w = torch.nn.Parameter(torch.randn(8, 4, device="cuda"))
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt = bf.AdaBreg([w], lr=torch.tensor(1e-3), capturable=True, backend=backend)
    with pytest.raises(ValueError, match="lr tensor on cpu"):
        opt.step()
    assert torch.equal(w, before) and len(opt.state) == 0


@needs_gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_step_counters_follow_the_capturable_flag_on_gpu(backend):
    w = torch.nn.Parameter(torch.randn(8, 4, device="cuda"))
    w.grad = torch.randn_like(w)
    opt = bf.AdaBreg([w], lr=1e-3, backend=backend)
    opt.step()
    assert opt.state[w]["step"].device.type == "cpu"
    opt.param_groups[0]["capturable"] = True
    opt.step()
    assert opt.state[w]["step"].device == w.device and float(opt.state[w]["step"]) == 2.0
    sd = opt.state_dict()
    fresh = bf.AdaBreg([w], lr=1e-3, backend=backend, capturable=False)
    fresh.load_state_dict(sd)  # the saved group is capturable: its counters go to the param's device
    assert fresh.state[w]["step"].device == w.device


@needs_gpu
def test_capture_refuses_a_step_that_would_replay_wrongly():
    dev = torch.device("cuda")
    w = torch.nn.Parameter(torch.randn(8, 4, device=dev))
    w.grad = torch.randn_like(w)
    for opt in (bf.AdaBreg([w], lr=1e-3, capturable=False),
                bf.AdaBreg([w], lr=torch.tensor(1e-3, device=dev), capturable=True, backend="reference")):
        opt.step()  # states exist: only the refusal is left to capture
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="capturable=True|cannot be captured"):
            with torch.cuda.graph(graph):
                opt.step()
    # capturing the first step would record the state creation, replayed (and reset) every time
    fresh = bf.AdaBreg([w], lr=torch.tensor(1e-3, device=dev), capturable=True)
    with pytest.raises(RuntimeError, match="warm-up"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            fresh.step()


# ---- density() reads one counts buffer per bucket [note: counts buffer] -----------------------------
def _true_density(params):
    return sum(int(torch.count_nonzero(p)) for p in params) / sum(p.numel() for p in params)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("capturable", [False, True])
def test_counts_land_in_one_buffer_per_bucket(backend, capturable):
    params, opt = _make("adabreg", backend, bf.L1(lamda=0.25), capturable=capturable)
    buffers = None
    for k in range(6):
        _set_grads(params, k)
        if k == 2:  # a skipped AMP step keeps the counts of the unchanged θ
            opt.found_inf = torch.ones(())
        if k == 3:  # a param without grad: the bucket is rebuilt without it
            params[1].grad = None
        opt.step()
        opt.__dict__.pop("found_inf", None)
        assert opt.density() == _true_density(params)
        now = [c for _, c in opt._counts.latest.values()]
        buffers = buffers or now
        if k < 3:
            assert all(a is b for a, b in zip(now, buffers))  # the same tensors, updated in place
        if k == 4 and capturable:
            # the same params again: a graph captured before the rebuild writes this buffer at every
            # replay, so the rebuilt bucket must find it again (and it must never be freed)
            assert all(a is b for a, b in zip(now, buffers))


@needs_gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_density_follows_replays_and_eager_steps_in_between(backend):
    """Before the counts buffer, an eager step after the capture replaced the tensor density() read,
    so later replays no longer reached it."""
    if backend == "cuda" and not loader.cuda_available():
        pytest.skip(f"CUDA extension not built: {loader.cuda_error()}")
    dev = torch.device("cuda")
    params, opt = _make("linbreg", backend, bf.L1(lamda=0.25), capturable=True, device=dev,
                        lr=torch.tensor(0.1, device=dev))
    _set_grads(params, 0, dev)
    warm_up_on_side_stream(lambda k: opt.step(), 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    assert opt.density() == _true_density(params)  # capture ran nothing: still the warm-up's counts
    for k in range(1, 5):
        for p, g in zip(params, [torch.randn(p.shape, device=dev) for p in params]):
            p.grad.copy_(g)
        if k == 2:
            opt.step()  # eager, between replays
        else:
            graph.replay()
        torch.cuda.synchronize()
        assert opt.density() == _true_density(params), k
