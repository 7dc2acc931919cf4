"""Bad input, table-driven: every case asserts the exception type, a keyword of its message, and
that params and every state tensor are bit-identical afterwards (a refused call changes nothing),
on every backend that runs here."""
from __future__ import annotations

import copy
import io
import os

import pytest
import torch

import bregman_fused as bf
from bregman_fused import functional as F
from bregman_fused.backends import unavailable_reason


def _runnable(backend: str) -> str | None:
    if backend == "reference":
        return None
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return "set TRITON_INTERPRET=1 to run the Triton kernels on the CPU"
    return unavailable_reason(backend, torch.device("cpu"), bf.NoReg())


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(_runnable(b) is not None, reason=str(_runnable(b))))
            for b in ("reference", "cpu", "triton")]


class World:
    """A two-group model (linear weights with L1, a conv weight with KernelL1L2, biases without)
    and an optimizer that has taken two steps, so every state exists."""

    def __init__(self, cls_name: str, backend: str):
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 4)
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.params = [self.lin.weight, self.conv.weight, self.lin.bias, self.conv.bias]
        groups = [{"params": [self.lin.weight], "reg": bf.L1(0.05)},
                  {"params": [self.conv.weight], "reg": bf.KernelL1L2(0.05)},
                  {"params": [self.lin.bias, self.conv.bias]}]
        kw = {"LinBreg": dict(lr=0.1, momentum=0.5), "AdaBreg": dict(lr=1e-3), "ProxSGD": dict(lr=0.1)}[cls_name]
        self.opt = getattr(bf, cls_name)(groups, backend=backend, **kw)
        for k in range(2):
            self.grads(k)
            self.opt.step()
        self.grads(2)

    def grads(self, k):
        for i, p in enumerate(self.params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i))

    def snapshot(self):
        return ([p.detach().clone() for p in self.params],
                {id(p): {k: _copy(v) for k, v in self.opt.state[p].items()} for p in self.params if p in self.opt.state},
                copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]))

    def assert_unchanged(self, snap):
        params, states, groups = snap
        for p, before in zip(self.params, params):
            assert torch.equal(p.detach(), before), "a param changed"
        for p in self.params:
            if id(p) in states:
                now = {k: v for k, v in self.opt.state[p].items()}
                assert now.keys() == states[id(p)].keys()
                for key, value in states[id(p)].items():
                    assert _same(now[key], value), f"state {key!r} changed"
        assert len(self.opt.param_groups) == len(groups)


def _copy(v):
    return v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)


def _same(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b


def _ckpt(w: World):
    buf = io.BytesIO()
    torch.save(w.opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _set_group(i, key, value):
    def edit(w):
        w.opt.param_groups[i][key] = value
        w.opt.step()
    return edit


def _edit_ckpt(change):
    def run(w):
        sd = _ckpt(w)
        change(w, sd)
        w.opt.load_state_dict(sd)
    return run


def _other_ckpt(make):
    def run(w):
        w.opt.load_state_dict(make(w).state_dict())
    return run


def _state(i, action):
    """(edit opt.state by hand, then step): the step must refuse and leave the edited state as it is."""
    return (lambda w: action(w.opt.state[w.params[i]]), lambda w: w.opt.step())


def _bad_grad(w):
    w.conv.weight.grad.data = torch.randn(5)  # .data may change a grad's shape; the setter may not
    w.opt.step()


def _convert_one(w):
    w.conv.weight.data = w.conv.weight.data.double()  # a module converted after a step
    w.conv.weight.grad = None
    w.conv.weight.grad = torch.randn(w.conv.weight.shape, dtype=torch.float64)
    w.opt.step()


def _with_grad(p):
    p.grad = torch.ones_like(p)
    return p


def _sparse_grad(w):
    w.lin.bias.grad = torch.randn(4).to_sparse()
    w.opt.step()


# (id, optimizers it applies to, action on a World, exception, keyword of the message)
ALL = ("LinBreg", "AdaBreg", "ProxSGD")
BREG = ("LinBreg", "AdaBreg")
CASES = [
    # -- a group's keys edited between steps ------------------------------------------------------
    ("lr-negative", ALL, _set_group(2, "lr", -0.1), ValueError, "lr"),
    ("lr-nan", ALL, _set_group(2, "lr", float("nan")), ValueError, "lr"),
    ("lr-string", ALL, _set_group(1, "lr", "fast"), ValueError, "lr"),
    ("lr-int-tensor", ALL, _set_group(2, "lr", torch.tensor(1)), ValueError, "lr"),
    ("lr-two-element-tensor", ALL, _set_group(2, "lr", torch.tensor([0.1, 0.2])), ValueError, "lr"),
    ("reg-string", ALL, _set_group(2, "reg", "l1"), TypeError, "reg"),
    ("reg-negative-lamda", ALL, lambda w: (setattr(w.opt.param_groups[1]["reg"], "lamda", -1.0), w.opt.step()),
     ValueError, "lamda"),
    ("reg-nan-lamda", ALL, lambda w: (setattr(w.opt.param_groups[1]["reg"], "lamda", float("nan")), w.opt.step()),
     ValueError, "lamda"),
    ("delta-zero", BREG, _set_group(2, "delta", 0.0), ValueError, "delta"),
    ("delta-string", BREG, _set_group(2, "delta", "one"), ValueError, "delta"),
    ("momentum-one", ("LinBreg",), _set_group(2, "momentum", 1.0), ValueError, "momentum"),
    ("betas-single", ("AdaBreg",), _set_group(2, "betas", (0.9,)), ValueError, "betas"),
    ("beta2-above-one", ("AdaBreg",), _set_group(2, "betas", (0.9, 1.5)), ValueError, "beta2"),
    ("eps-negative", ("AdaBreg",), _set_group(2, "eps", -1e-8), ValueError, "eps"),
    ("capturable-string", ALL, _set_group(2, "capturable", "yes"), TypeError, "capturable"),
    ("lamda-numeric-string", ALL, lambda w: (setattr(w.opt.param_groups[0]["reg"], "lamda", "0.5"), w.opt.step()),
     ValueError, "lamda"),
    ("lr-deleted", ALL, lambda w: (w.opt.param_groups[1].pop("lr"), w.opt.step()), ValueError, "lacks ['lr']"),
    # -- keys that would be ignored: torch.optim options, other optimizers' options, backend ------
    ("maximize-true", ALL, _set_group(0, "maximize", True), ValueError, "maximize"),
    ("weight-decay", ALL, _set_group(1, "weight_decay", 1e-4), ValueError, "weight_decay"),
    ("nesterov", ("LinBreg",), _set_group(0, "nesterov", True), ValueError, "nesterov"),
    ("amsgrad", ("AdaBreg",), _set_group(0, "amsgrad", True), ValueError, "amsgrad"),
    ("group-backend", ALL, _set_group(2, "backend", "reference"), ValueError, "backend"),
    ("betas-in-linbreg", ("LinBreg", "ProxSGD"), _set_group(2, "betas", (0.9, 0.999)), ValueError, "AdaBreg"),
    ("delta-in-proxsgd", ("ProxSGD",), _set_group(2, "delta", 0.5), ValueError, "delta"),
    ("moments-in-proxsgd", ("ProxSGD",), _set_group(2, "moments", "bf16"), ValueError, "moments"),
    # -- a group's params or regularizer object replaced between steps -----------------------------
    ("params-listed-twice", ALL, lambda w: (w.opt.param_groups[0]["params"].append(w.lin.weight), w.opt.step()),
     ValueError, "twice"),
    ("param-in-two-groups", ALL, lambda w: (w.opt.param_groups[2]["params"].append(w.lin.weight), w.opt.step()),
     ValueError, "more than one param group"),
    ("complex-param-appended", ALL, lambda w: (w.opt.param_groups[2]["params"].append(_with_grad(
        torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64)))), w.opt.step()), ValueError, "complex"),
    ("reg-replaced-misfit", ALL, _set_group(0, "reg", bf.KernelL1L2(0.1)), ValueError, "KernelL1L2"),
    # -- grads and params ---------------------------------------------------------------------------
    ("sparse-grad", ALL, _sparse_grad, RuntimeError, "sparse"),
    ("converted-param", ALL, _convert_one, RuntimeError, "converted"),
    ("grad-of-another-shape", ALL, _bad_grad, (RuntimeError, ValueError), "grads"),
    # -- opt.state edited by hand -----------------------------------------------------------------
    ("state-dual-wrong-shape", BREG, _state(1, lambda s: s.__setitem__("dual", torch.zeros(3))), ValueError, "dual"),
    ("state-dual-float64", BREG, _state(0, lambda s: s.__setitem__("dual", s["dual"].double())), ValueError, "dual"),
    ("state-without-step", BREG, _state(0, lambda s: s.pop("step")), ValueError, "step"),
    ("state-without-exp-avg-sq", ("AdaBreg",), _state(1, lambda s: s.pop("exp_avg_sq")), ValueError, "exp_avg_sq"),
    ("state-dual-a-list", BREG, _state(0, lambda s: s.__setitem__("dual", [0.0])), ValueError, "dual"),
    # -- load_state_dict ----------------------------------------------------------------------------
    ("ckpt-extra-group", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"].append(dict(sd["param_groups"][2], params=[99]))),
     ValueError, "param groups"),
    ("ckpt-missing-group", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"].pop()), ValueError, "param groups"),
    ("ckpt-other-optimizer", ALL, _edit_ckpt(lambda w, sd: sd["bregman_fused"].update(optimizer="Mystery")),
     ValueError, "Mystery"),
    ("ckpt-without-reg", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"][0].pop("reg")), ValueError, "reg"),
    ("ckpt-unknown-reg", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"][0].update(reg={"name": "Hard"})),
     ValueError, "Hard"),
    ("ckpt-reg-bad-lamda", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"][0].update(reg={"name": "L1", "lamda": -1})),
     ValueError, "lamda"),
    ("ckpt-reg-misfit", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"][0].update(reg={"name": "KernelL1L2", "lamda": 0.1})),
     ValueError, "KernelL1L2"),
    ("ckpt-state-wrong-shape", BREG, _edit_ckpt(lambda w, sd: sd["state"][0].update(dual=torch.zeros(2))),
     ValueError, "shape"),
    ("ckpt-state-without-step", BREG, _edit_ckpt(lambda w, sd: sd["state"][0].pop("step")), ValueError, "step"),
    ("ckpt-state-without-exp-avg-sq", ("AdaBreg",), _edit_ckpt(lambda w, sd: sd["state"][1].pop("exp_avg_sq")),
     ValueError, "exp_avg_sq"),
    ("ckpt-group-param-count", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"][2].update(params=[2])),
     ValueError, "params"),
    ("ckpt-not-a-dict", ALL, lambda w: w.opt.load_state_dict([1, 2]), ValueError, "state dict"),
    ("ckpt-of-adabreg", ("LinBreg", "ProxSGD"), _other_ckpt(lambda w: _twin(w, "AdaBreg")), ValueError, "AdaBreg"),
    ("ckpt-of-linbreg", ("AdaBreg", "ProxSGD"), _other_ckpt(lambda w: _twin(w, "LinBreg")), ValueError, "LinBreg"),
    ("ckpt-of-torch-adam", ALL, _other_ckpt(lambda w: _torch_twin(w, torch.optim.Adam)), ValueError, "checkpoint"),
    ("ckpt-of-torch-sgd", ALL, _other_ckpt(lambda w: _torch_twin(w, torch.optim.SGD)), ValueError, "checkpoint"),
    # a checkpoint that loads is one that steps: its values are checked as a step checks them
    ("ckpt-beta2-above-one", ("AdaBreg",), _edit_ckpt(lambda w, sd: sd["param_groups"][0].update(betas=(0.9, 1.5))),
     ValueError, "beta2"),
    ("ckpt-delta-zero", BREG, _edit_ckpt(lambda w, sd: sd["param_groups"][1].update(delta=0.0)), ValueError, "delta"),
    ("ckpt-capturable-string", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"][1].update(capturable="yes")),
     ValueError, "capturable"),
    ("ckpt-maximize", ALL, _edit_ckpt(lambda w, sd: sd["param_groups"][1].update(maximize=True)), ValueError,
     "maximize"),
    ("ckpt-step-nan", ALL, _edit_ckpt(lambda w, sd: sd["state"][0].update(step=torch.tensor(float("nan")))),
     ValueError, "step"),
    ("ckpt-step-fraction", ALL, _edit_ckpt(lambda w, sd: sd["state"][0].update(step=torch.tensor(2.5))),
     ValueError, "whole number"),
    ("ckpt-step-two-elements", ALL, _edit_ckpt(lambda w, sd: sd["state"][0].update(step=torch.tensor([1.0, 2.0]))),
     ValueError, "step"),
    # -- reinit_dual ----------------------------------------------------------------------------------
    ("reinit-index-out-of-range", BREG, lambda w: w.opt.reinit_dual(5), ValueError, "group_index"),
    ("reinit-index-string", BREG, lambda w: w.opt.reinit_dual("0"), ValueError, "group_index"),
    ("reinit-delta-zero", BREG, lambda w: (w.opt.param_groups[0].__setitem__("delta", 0.0), w.opt.reinit_dual()),
     ValueError, "delta"),
    ("reinit-lamda-nan", BREG, lambda w: (setattr(w.opt.param_groups[0]["reg"], "lamda", float("nan")),
                                          w.opt.reinit_dual(0)), ValueError, "lamda"),
    # -- add_param_group ------------------------------------------------------------------------------
    ("add-group-param-twice", ALL, lambda w: w.opt.add_param_group({"params": [w.lin.weight]}), ValueError, "parameter"),
    ("add-group-empty", ALL, lambda w: w.opt.add_param_group({"params": []}), ValueError, "no parameters"),
    ("add-group-bad-lr", ALL, lambda w: w.opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": -1}),
     ValueError, "lr"),
    ("add-group-int-param", ALL, lambda w: w.opt.add_param_group({"params": [torch.ones(2, dtype=torch.int64)]}),
     ValueError, "floating-point"),
    ("add-group-kernel-reg-on-vector", ALL,
     lambda w: w.opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "reg": bf.KernelL1L2(0.1)}),
     ValueError, "KernelL1L2"),
]


def _twin(w: World, cls_name: str):
    twin = World(cls_name, "reference")
    return twin.opt


def _torch_twin(w: World, cls):
    params = [torch.nn.Parameter(p.detach().clone()) for p in w.params]
    groups = [{"params": params[:1]}, {"params": params[1:2]}, {"params": params[2:]}]
    opt = cls(groups, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


APPLIED = [(case_id, cls_name, action, exc, keyword)
           for case_id, applies, action, exc, keyword in CASES for cls_name in applies]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,cls_name,action,exc,keyword", APPLIED, ids=[f"{c[0]}-{c[1]}" for c in APPLIED])
def test_refused_and_nothing_changed(backend, case_id, cls_name, action, exc, keyword):
    w = World(cls_name, backend)
    prepare, act = action if isinstance(action, tuple) else (None, action)
    if prepare is not None:
        prepare(w)
    snap = w.snapshot()
    with pytest.raises(exc) as info:
        act(w)
    assert keyword.lower() in str(info.value).lower(), str(info.value)
    w.assert_unchanged(snap)


# -- constructors and regularizers: nothing exists yet, so type and message ---------------------------
def _p():
    return [torch.nn.Parameter(torch.randn(3, 2))]


CONSTRUCTION = [
    ("linbreg-lr-negative", lambda: bf.LinBreg(_p(), lr=-1), ValueError, "lr"),
    ("linbreg-delta-zero", lambda: bf.LinBreg(_p(), delta=0), ValueError, "delta"),
    ("linbreg-momentum-one", lambda: bf.LinBreg(_p(), momentum=1.0), ValueError, "momentum"),
    ("adabreg-betas-triple", lambda: bf.AdaBreg(_p(), betas=(0.9, 0.99, 0.9)), ValueError, "betas"),
    ("adabreg-beta1-one", lambda: bf.AdaBreg(_p(), betas=(1.0, 0.99)), ValueError, "beta1"),
    ("adabreg-eps-nan", lambda: bf.AdaBreg(_p(), eps=float("nan")), ValueError, "eps"),
    ("proxsgd-lr-inf", lambda: bf.ProxSGD(_p(), lr=float("inf")), ValueError, "lr"),
    ("unknown-backend", lambda: bf.LinBreg(_p(), backend="gpu"), ValueError, "backend"),
    ("reg-not-a-regularizer", lambda: bf.LinBreg(_p(), reg=0.1), TypeError, "reg"),
    ("capturable-not-bool", lambda: bf.AdaBreg(_p(), capturable=1), TypeError, "capturable"),
    ("complex-param", lambda: bf.LinBreg([torch.zeros(2, dtype=torch.complex64)]), ValueError, "complex"),
    ("param-twice", lambda: bf.LinBreg(_p() * 2), ValueError, "twice"),
    ("used-up-generator", lambda: bf.LinBreg([{"params": iter(())}]), ValueError, "no parameters"),
    ("kernel-reg-on-linear", lambda: bf.LinBreg(_p(), reg=bf.KernelL1L2(0.1)), ValueError, "KernelL1L2"),
    ("l1-lambda-keyword", lambda: bf.L1(lambda_=0.1), TypeError, "lamda"),
    ("l1-string", lambda: bf.L1("x"), ValueError, "lamda"),
    ("l1-negative", lambda: bf.L1(-0.1), ValueError, "lamda"),
    ("l1-no-strength", lambda: bf.L1(), TypeError, "lamda"),
    ("sparse-group-one-strength", lambda: bf.SparseGroupL1L2(0.1), TypeError, "lamda_group"),
    ("sparse-group-wrong-keyword", lambda: bf.SparseGroupL1L2(lamda=0.1, lamda_group=0.1), TypeError, "lamda_l1"),
    ("group-reg-inf", lambda: bf.GroupL1L2(float("inf")), ValueError, "lamda"),
    ("sparsify-density-above-one", lambda: bf.sparsify_(torch.nn.Linear(3, 2), 1.5), ValueError, "density"),
    ("sparsify-bad-mode", lambda: bf.sparsify_(torch.nn.Linear(3, 2), 0.1, linear="rows"), ValueError, "mode"),
    ("scheduler-unknown-strength", lambda: bf.LamdaScheduler(bf.LinBreg(_p(), reg=bf.L1(0.1)), lamda_max=0.1)
     if False else bf.schedulers.set_strength(bf.LinBreg(_p(), reg=bf.L1(0.1)), 0, lamdda=0.1), (TypeError, ValueError),
     "lamd"),
]


@pytest.mark.parametrize("case_id,make,exc,keyword", CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_construction_refused_with_a_clear_message(case_id, make, exc, keyword):
    with pytest.raises(exc) as info:
        make()
    assert keyword.lower() in str(info.value).lower(), str(info.value)


# -- the functional API validates what it is given, on every backend ---------------------------------
def _functional_case(change):
    def run(backend):
        params = [torch.randn(4, 3), torch.randn(5)]
        grads = [torch.randn_like(p) for p in params]
        states = F.init_states("adabreg", params, reg=bf.L1(0.1))
        args = dict(params=params, grads=grads, **states)
        change(args)
        snap = [t.clone() for t in args["params"] + args["duals"] + args["exp_avgs"] + args["exp_avg_sqs"] + args["steps"]]
        try:
            F.adabreg(**{"lr": 1e-3, **args}, reg=bf.L1(0.1), backend=backend)
        finally:
            now = args["params"] + args["duals"] + args["exp_avgs"] + args["exp_avg_sqs"] + args["steps"]
            assert all(torch.equal(a, b) for a, b in zip(now, snap) if a.shape == b.shape), "a tensor changed"
    return run


FUNCTIONAL = [
    ("grads-too-few", lambda a: a.update(grads=a["grads"][:1]), "grads"),
    ("grad-wrong-shape", lambda a: a["grads"].__setitem__(1, torch.randn(6)), "grads[1]"),
    ("grad-broadcastable", lambda a: a["grads"].__setitem__(1, torch.randn(1)), "grads[1]"),
    ("dual-float64", lambda a: a["duals"].__setitem__(0, a["duals"][0].double()), "duals[0]"),
    ("exp-avg-sqs-missing", lambda a: a.update(exp_avg_sqs=[]), "exp_avg_sqs"),
    ("float64-params-float32-states", lambda a: a.update(params=[p.double() for p in a["params"]],
                                                          grads=[g.double() for g in a["grads"]]), "duals[0]"),
    # the hyper-parameters, checked before anything is written (beta1 = 1 divided by zero half-way)
    ("beta1-one", lambda a: a.update(beta1=1.0), "beta1"),
    ("beta2-two", lambda a: a.update(beta2=2.0), "beta2"),
    ("eps-negative", lambda a: a.update(eps=-1.0), "eps"),
    ("delta-zero", lambda a: a.update(delta=0.0), "delta"),
    ("lr-nan", lambda a: a.update(lr=float("nan")), "lr"),
    ("lr-string", lambda a: a.update(lr="0.1"), "lr"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,change,keyword", FUNCTIONAL, ids=[c[0] for c in FUNCTIONAL])
def test_functional_refuses_and_changes_nothing(backend, case_id, change, keyword):
    with pytest.raises((ValueError, RuntimeError, TypeError)) as info:
        _functional_case(change)(backend)
    assert keyword in str(info.value), str(info.value)


def test_functional_momentum_without_buffers_and_unknown_backend():
    p, g = [torch.randn(3)], [torch.randn(3)]
    with pytest.raises(ValueError, match="momentum_buffers"):
        F.linbreg(p, g, [p[0].clone()], [], [torch.zeros(())], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="backend"):
        F.linbreg(p, g, [p[0].clone()], [], [torch.zeros(())], lr=0.1, backend="gpu")
