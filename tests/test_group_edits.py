"""What a user sets or edits on an optimizer after it was made is never silently ignored: the
checks of construction run again where a group changed, torch.optim's no-op option values pass,
and a checkpoint restores a user's own regularizer subclass (not a built-in class of its name)."""
from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import bregman_fused as bf
from bregman_fused import functional as F


def _model_opt(cls=bf.LinBreg, reg=None, backend="reference", **kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(torch.randn(6))
    opt = cls([{"params": [w], "reg": reg if reg is not None else bf.L1(0.1)}, {"params": [b]}], backend=backend,
              **kw)
    return w, b, opt


def _step(params, opt, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


@pytest.mark.parametrize("key,value", [("maximize", False), ("weight_decay", 0), ("weight_decay", 0.0),
                                       ("foreach", None), ("fused", True), ("differentiable", False),
                                       ("amsgrad", False), ("nesterov", False), ("dampening", 0)])
def test_torch_options_at_their_no_op_value_pass(key, value):
    # configs written for torch.optim carry these keys; at the value that asks for nothing they pass
    w, b, opt = _model_opt()
    opt.param_groups[0][key] = value
    _step([w, b], opt, 0)


def test_a_misspelt_key_added_after_construction_warns_once():
    w, b, opt = _model_opt()
    _step([w, b], opt, 0)
    opt.param_groups[0]["lamda"] = 0.5
    with pytest.warns(UserWarning, match="'lamda' is not an option"):
        _step([w, b], opt, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same keys: checked already, no warning per step
        _step([w, b], opt, 2)


def test_a_param_moved_between_groups_is_stepped_by_its_new_group():
    # an edit that passes the checks takes effect: the bias now has the L1 group's regularizer
    w, b, opt = _model_opt(reg=bf.L1(10.0))
    _step([w, b], opt, 0)
    opt.param_groups[1]["params"].remove(b)
    opt.param_groups[0]["params"].append(b)
    opt.param_groups.pop(1)
    _step([w, b], opt, 1)
    assert torch.count_nonzero(b) == 0  # λ = 10 zeroes it; unregularized it would not be


class LoggingL1(bf.L1):
    keeps_builtin_map = True  # same math as L1: the fused backends may run it


class HalfShrinkL1(bf.L1):
    def shrink(self, x, t=1.0):
        return super().shrink(x, t) * 0.5


@pytest.mark.parametrize("reg_cls,backend", [(LoggingL1, "cpu"), (HalfShrinkL1, "reference")])
def test_a_checkpoint_restores_a_regularizer_subclass(reg_cls, backend):
    w, b, opt = _model_opt(reg=reg_cls(0.1), backend=backend)
    _step([w, b], opt, 0)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["reg"] == {"name": reg_cls.__name__, "lamda": 0.1}
    sd["param_groups"][0]["reg"]["lamda"] = 0.2
    w2, b2, opt2 = _model_opt(reg=reg_cls(0.1), backend=backend)
    opt2.load_state_dict(sd)
    reg = opt2.param_groups[0]["reg"]
    assert type(reg) is reg_cls and reg.lamda == 0.2  # the subclass, with the checkpoint's λ
    # and it steps with the subclass's math, as an optimizer made with it does
    w3, b3, opt3 = _model_opt(reg=reg_cls(0.2), backend=backend)
    opt3.load_state_dict(sd)
    for p, q in zip((w2, b2), (w3, b3)):
        q.data.copy_(p)
    _step([w2, b2], opt2, 1)
    _step([w3, b3], opt3, 1)
    assert torch.equal(w2, w3) and torch.equal(b2, b3)


def test_a_subclass_checkpoint_into_another_class_is_refused():
    w, b, opt = _model_opt(reg=HalfShrinkL1(0.1))
    _step([w, b], opt, 0)
    sd = opt.state_dict()
    _, _, other = _model_opt(reg=bf.L1(0.1))
    with pytest.raises(ValueError, match="Unknown regularizer 'HalfShrinkL1'"):
        other.load_state_dict(sd)


def test_nuclear_with_a_non_finite_grad_gives_nan_not_a_half_step():
    # torch's SVD raises on NaN; the step must not stop after writing some params
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6, 6)), torch.nn.Parameter(torch.randn(6, 6))
    opt = bf.LinBreg([{"params": [a, b], "reg": bf.Nuclear(0.1)}], lr=0.1, backend="reference")
    _step([a, b], opt, 0)
    a.grad, b.grad = torch.randn(6, 6), torch.randn(6, 6)
    b.grad[0, 0] = float("nan")
    opt.step()
    assert torch.isfinite(a).all() and torch.isnan(b).all()
    assert [float(opt.state[p]["step"]) for p in (a, b)] == [2.0, 2.0]
    assert torch.isnan(opt.param_groups[0]["reg"].value(b.detach()))


def test_functional_linbreg_checks_momentum_before_writing():
    p, g = [torch.randn(3)], [torch.randn(3)]
    states = F.init_states("linbreg", p, momentum=0.5)
    before = [t.clone() for t in states["duals"] + states["momentum_buffers"] + states["steps"]]
    with pytest.raises(ValueError, match="momentum"):
        F.linbreg(p, g, **states, lr=0.1, momentum=1.5)
    after = states["duals"] + states["momentum_buffers"] + states["steps"]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_a_refused_edit_is_refused_again_at_the_next_step():
    # the buckets of the edited group are cached by the refused step; the retry must not skip the check
    w, b, opt = _model_opt(backend="cpu")
    _step([w, b], opt, 0)
    opt.param_groups[1]["params"].append(w)
    before = [w.detach().clone(), b.detach().clone()]
    for _ in range(2):
        with pytest.raises(ValueError, match="more than one param group"):
            _step([w, b], opt, 1)
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])


@pytest.mark.parametrize("key,value", [("foreach", False), ("fused", False), ("maximize", np.False_),
                                       ("weight_decay", np.float32(0)), ("weight_decay", torch.tensor(0.0))])
def test_implementation_choices_and_numpy_or_tensor_no_op_values_pass(key, value):
    w, b, opt = _model_opt()
    opt.param_groups[0][key] = value
    _step([w, b], opt, 0)


def test_numpy_scalars_and_arrays_are_numbers():
    w, b, opt = _model_opt(lr=np.array(0.1))
    opt.param_groups[1]["delta"] = np.float32(0.5)
    _step([w, b], opt, 0)


def test_emptying_a_group_between_steps_is_fine():
    w, b, opt = _model_opt()
    _step([w, b], opt, 0)
    opt.param_groups[1]["params"] = []
    _step([w, b], opt, 1)


def test_a_group_added_after_construction_warns_once_about_a_misspelt_key():
    w, b, opt = _model_opt()
    extra = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="'lamda' is not an option"):
        opt.add_param_group({"params": [extra], "lamda": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step([w, b, extra], opt, 0)


@pytest.mark.parametrize("copy_of", ["deepcopy", "pickle"])
def test_a_copied_optimizer_loads_a_checkpoint(copy_of):
    # torch's __setstate__ adds "differentiable" to the copy's defaults; a checkpoint lacks it
    w, b, opt = _model_opt(cls=bf.AdaBreg, lr=1e-3)
    _step([w, b], opt, 0)
    twin = copy.deepcopy(opt) if copy_of == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin.load_state_dict(opt.state_dict())


def test_grads_that_come_and_go_recheck_only_what_changed():
    # a step that rebuilds its buckets re-checks params against the cache of those that passed;
    # a param replaced in place by one the regularizer cannot act on is still refused
    torch.manual_seed(0)
    conv = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
    lin = torch.nn.Parameter(torch.randn(4, 6))
    opt = bf.LinBreg([{"params": [conv], "reg": bf.KernelL1L2(0.1)}, {"params": [lin]}], backend="cpu")
    for k in range(4):  # lin has a grad only every other step: its group's buckets are rebuilt each time
        conv.grad = torch.randn_like(conv)
        lin.grad = torch.randn_like(lin) if k % 2 else None
        opt.step()
    opt.param_groups[0]["params"][0] = lin2 = torch.nn.Parameter(torch.randn(4, 6))
    lin2.grad = torch.randn_like(lin2)
    with pytest.raises(ValueError, match="KernelL1L2"):
        opt.step()


@pytest.mark.parametrize("merge", ["|=", "update", "setdefault"])
def test_a_state_merged_into_opt_state_is_tracked_like_an_assigned_one(merge):
    # dict's own |= stores the new dict unwrapped: a tensor replaced in it later would go unnoticed
    w, b, opt = _model_opt(bf.AdaBreg, backend="cpu")
    for seed in range(2):
        _step([w, b], opt, seed)
    if merge == "|=":
        opt.state |= {w: {}}
    elif merge == "update":
        opt.state.update({w: {}})
    else:
        del opt.state[w]
        opt.state.setdefault(w, {})
    for seed in range(2, 4):
        _step([w, b], opt, seed)
    new = torch.zeros_like(opt.state[w]["exp_avg"])
    opt.state[w]["exp_avg"] = new
    _step([w, b], opt, 4)
    assert opt.state[w]["exp_avg"] is new and new.abs().sum() > 0  # the step updated the tensor now there


@pytest.mark.parametrize("cls", [bf.LinBreg, bf.AdaBreg, bf.ProxSGD])
def test_torch_optim_keywords_to_a_constructor_are_judged_as_group_keys(cls):
    p = [torch.nn.Parameter(torch.randn(3))]
    # no-op values and implementation choices: accepted, and nothing kept (they ask for nothing)
    opt = cls(p, maximize=False, weight_decay=0, foreach=True, fused=False, differentiable=False)
    assert not {"maximize", "weight_decay", "foreach", "fused"} & set(opt.param_groups[0])
    with pytest.raises(ValueError, match=r"has no option 'weight_decay' \(weight_decay=0.0001\): .*reg="):
        cls(p, weight_decay=1e-4)
    with pytest.raises(ValueError, match="has no option 'maximize'.*negate the loss"):
        cls(p, maximize=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'lamda'; did you mean reg=bf.L1"):
        cls(p, lamda=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        cls(p, bogus=1)


def test_an_option_of_another_bregman_optimizer_as_a_keyword_names_its_owner():
    with pytest.raises(TypeError, match=r"'momentum' is an option of LinBreg"):
        bf.AdaBreg([torch.nn.Parameter(torch.randn(3))], momentum=0.9)
