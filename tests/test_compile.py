"""torch.compile and torch.library citizenship: fake kernels for every op (torch.library.opcheck),
a fullgraph-compiled ``opt.step`` equal to eager, no graph break inside our step in a compiled
training step, and a scheduler-driven tensor lr that does not recompile per value."""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import bregman_fused as bf
from bregman_fused import functional as F
from bregman_fused.backends import loader

needs_cpu_op = pytest.mark.skipif(not loader.cpu_available(), reason=f"C++ extension: {loader.cpu_error()}")

KINDS = {"linbreg": 0, "linbreg_momentum": 0, "adabreg": 1, "proxsgd": 2}
REGS = {"none": (bf.NoReg(), 0), "l1": (bf.L1(0.1), 1), "l1pos": (bf.L1Pos(0.1), 2), "group": (bf.GroupL1L2(0.1), 3),
        "sparse_group": (bf.SparseGroupL1L2(0.1, 0.05), 4)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _op_args(kind, reg_name, dtype, tensor_lr=False):
    reg, code = REGS[reg_name]
    params = [torch.randn(4, 3).to(dtype), torch.randn(7, 2).to(dtype)]
    grads = [torch.randn_like(p) for p in params]
    label = "linbreg" if kind.startswith("linbreg") else kind
    states = F.init_states(label, params, reg=reg, momentum=0.9 if kind == "linbreg_momentum" else 0.0)
    duals = states.get("duals", [])
    exp_avgs = states.get("momentum_buffers") or states.get("exp_avgs", [])
    exp_avg_sqs = states.get("exp_avg_sqs", [])
    steps = [s + 1 for s in states["steps"]]
    sizes = [reg.group_size(p.shape) if code in (3, 4) else 1 for p in params]
    l1, group = reg.lamdas()
    lr = torch.tensor(1e-2, dtype=torch.float64) if tensor_lr else 1e-2
    return (KINDS[kind], params, grads, duals, exp_avgs, exp_avg_sqs, [], [], steps, sizes, lr, 0.9, 0.999, 1e-8, 1.0, code,
            l1, group, None, None)


@needs_cpu_op
@pytest.mark.parametrize("kind,reg_name,dtype", list(itertools.product(KINDS, REGS, DTYPES)),
                         ids=lambda x: str(x).replace("torch.", ""))
def test_opcheck_fused_step(kind, reg_name, dtype):
    """All of opcheck's tests (schema, autograd registration, fake tensor, AOT dispatch) for every
    kind, regularizer and dtype."""
    torch.library.opcheck(torch.ops.bregman_fused.fused_step.default, _op_args(kind, reg_name, dtype))


@needs_cpu_op
@pytest.mark.parametrize("kind,reg_name", [("adabreg", "l1"), ("linbreg_momentum", "group"), ("proxsgd", "sparse_group")])
def test_opcheck_fused_step_tensor_lr(kind, reg_name):
    torch.library.opcheck(torch.ops.bregman_fused.fused_step.tensor_lr, _op_args(kind, reg_name, torch.float32, True))


def _model_and_opt(backend, lr=1e-3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    opt = bf.AdaBreg([{"params": [model[0].weight], "reg": bf.L1(0.01)},
                      {"params": [model[2].weight], "reg": bf.GroupL1L2(0.01)},
                      {"params": [model[0].bias, model[2].bias]}], lr=lr, backend=backend)
    return model, opt


def _set_grads(model, k):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i))


@pytest.mark.parametrize("backend,compile_backend,exact", [
    pytest.param("cpu", "inductor", True, marks=needs_cpu_op),
    # the reference's per-tensor ops traced by dynamo: its Adam moments come out a few ulp off eager
    # (1-2 ulp of exp_avg_sq from the second step, seen with the eager and inductor backends alike;
    # the cause inside the tracing was not pinned down). The fused op is opaque to the compiler.
    ("reference", "eager", False),
    ("reference", "inductor", False),
])
def test_fullgraph_compiled_step_equals_eager(backend, compile_backend, exact):
    torch._dynamo.reset()
    model, opt = _model_and_opt(backend)
    twin, twin_opt = _model_and_opt(backend)
    step = torch.compile(opt.step, fullgraph=True, backend=compile_backend)  # from the first step on
    for k in range(4):
        _set_grads(model, k)
        _set_grads(twin, k)
        step()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        tensors = [(p.detach(), q.detach())] + [(opt.state[p][key], twin_opt.state[q][key]) for key in opt.state[p]]
        for a, b in tensors:
            if exact:
                assert torch.equal(a, b)
            else:
                eps = torch.finfo(a.dtype).eps  # a few ulp at the tensor's scale, as tests/configs.tolerance measures
                torch.testing.assert_close(a, b, rtol=16 * eps, atol=16 * eps * float(b.abs().max()))
    assert opt.density() == twin_opt.density()


@needs_cpu_op
def test_compiled_training_step_has_no_graph_break_in_our_step():
    torch._dynamo.reset()
    counters.clear()
    model, opt = _model_and_opt("cpu")
    x, y = torch.randn(16, 8), torch.randn(16, 3)

    @torch.compile
    def train_step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        train_step()
    ours = os.path.dirname(bf.__file__)
    breaks = [reason for reason in counters["graph_break"] if ours in reason or "bregman_fused" in reason]
    assert not breaks, breaks


@needs_cpu_op
def test_scheduler_tensor_lr_does_not_recompile_per_value():
    """A tensor lr (no capturable) driven by a scheduler: at most 2 graphs over 10 values (the
    scheduler's wrapper of opt.step is one graph break, as for torch's own optimizers), and the same
    results as eager with the same tensor lr."""
    torch._dynamo.reset()
    counters.clear()
    model, opt = _model_and_opt("cpu", lr=torch.tensor(1e-2))
    twin, twin_opt = _model_and_opt("cpu", lr=torch.tensor(1e-2))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    twin_sched = torch.optim.lr_scheduler.ExponentialLR(twin_opt, gamma=0.8)

    @torch.compile
    def step():
        opt.step()

    for k in range(10):
        _set_grads(model, k)
        _set_grads(twin, k)
        step()
        twin_opt.step()
        sched.step()
        twin_sched.step()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
