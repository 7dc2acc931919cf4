"""``bf.param_groups`` (conv / linear / other groups of a model) and ``opt.backends()``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bregman_fused as bf
from bregman_fused.backends import select
from bregman_fused.experiments.models import MLP


def _names(model):
    return {id(p): name for name, p in model.named_parameters()}


def _check_partition(model, groups):
    """Every parameter of the model in exactly one group."""
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in model.parameters()}


def test_resnet18_convs_head_and_rest():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    conv_reg, head_reg = bf.KernelL1L2(lamda=0.1), bf.L1(lamda=0.2)
    groups = bf.param_groups(model, conv=conv_reg, linear=head_reg)
    _check_partition(model, groups)
    assert [g["name"] for g in groups] == ["conv", "linear", "other"]
    names = _names(model)
    by_name = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert by_name["conv"] == convs and len(convs) == 20  # stem, 16 block convs, 3 downsample 1x1 convs
    assert by_name["linear"] == ["fc.weight"]
    assert "fc.bias" in by_name["other"] and "bn1.weight" in by_name["other"] and "layer4.1.bn2.bias" in by_name["other"]
    assert not any(n.endswith("conv1.weight") or n == "fc.weight" for n in by_name["other"])
    assert groups[0]["reg"] is conv_reg and groups[1]["reg"] is head_reg
    assert isinstance(groups[2]["reg"], bf.NoReg)
    # the groups go into an optimizer as they are, and the optimizer's own reg= does not reach "other"
    opt = bf.AdaBreg(groups, lr=1e-3, reg=bf.L1(lamda=9.0))
    assert [type(g["reg"]) for g in opt.param_groups] == [bf.KernelL1L2, bf.L1, bf.NoReg]


def test_papers_mlp_has_no_conv_group():
    model = MLP((64, 200, 80, 10))
    groups = bf.param_groups(model, conv=bf.KernelL1L2(lamda=0.1), linear=bf.L1(lamda=0.1))
    _check_partition(model, groups)
    assert [g["name"] for g in groups] == ["linear", "other"]  # an empty group is left out, not created
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(200, 64), (80, 200), (10, 80)]
    assert [tuple(p.shape) for p in groups[1]["params"]] == [(200,), (80,), (10,)]
    opt = bf.LinBreg(groups, lr=0.1)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()


def test_other_regularizer_and_custom_params():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.conv = nn.Conv1d(4, 3, 3)
            self.norm = nn.LayerNorm(3)
            self.scale = nn.Parameter(torch.ones(3))

    model = Net()
    groups = bf.param_groups(model, conv=bf.KernelL1L2(lamda=1.0), other=bf.L1(lamda=1e-4))
    _check_partition(model, groups)
    assert [g["name"] for g in groups] == ["conv", "other"]
    assert [names for names in (_names(model)[id(p)] for p in groups[1]["params"])] == \
        ["scale", "emb.weight", "conv.bias", "norm.weight", "norm.bias"]
    assert isinstance(groups[1]["reg"], bf.L1)


def test_a_regularizer_that_cannot_act_names_the_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"linear=KernelL1L2 cannot act on '2\.weight' \(Linear, shape \[3, 8\]\)"):
        bf.param_groups(model, linear=bf.KernelL1L2(lamda=0.1))
    with pytest.raises(ValueError, match=r"other=Nuclear cannot act on '0\.bias'"):
        bf.param_groups(model, other=bf.Nuclear(lamda=0.1))


def test_a_tied_parameter_in_two_groups_is_refused():
    model = nn.Module()
    model.emb = nn.Embedding(10, 4)
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = model.emb.weight  # weight tying: one tensor, an embedding and a Linear weight
    with pytest.raises(ValueError, match=r"'emb\.weight' is also 'head\.weight'.*'other'.*'linear'"):
        bf.param_groups(model, linear=bf.L1(lamda=0.1))
    # tied within one kind: listed once
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = shared.weight
    groups = bf.param_groups(model, linear=bf.L1(lamda=0.1))
    _check_partition(model, groups)
    assert len(groups[0]["params"]) == 1


def test_refused_arguments():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    reg = bf.L1(lamda=0.1)
    with pytest.raises(ValueError, match="same L1 object"):
        bf.param_groups(model, conv=reg, linear=reg)
    # a shared object that only one non-empty group uses, or one without a strength, is fine
    bf.param_groups(nn.Linear(3, 3), conv=reg, linear=reg)
    none = bf.NoReg()
    bf.param_groups(model, linear=none, other=none)
    with pytest.raises(TypeError, match=r"linear=L1 is the class; pass an instance"):
        bf.param_groups(model, linear=bf.L1)
    with pytest.raises(TypeError, match="not a bregman_fused regularizer"):
        bf.param_groups(model, conv=0.1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bf.param_groups(list(model.parameters()), linear=reg)
    with pytest.raises(ValueError, match="run one forward pass"):
        bf.param_groups(nn.LazyLinear(3), linear=reg)


# -- opt.backends(): what runs, while opt.backend stays what was asked ------------------------------
def _stepped(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


def test_backends_reports_each_bucket():
    w32, w64 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    low_rank = nn.Parameter(torch.randn(3, 3))
    l1 = bf.L1(lamda=0.1)
    opt = bf.LinBreg([{"params": [w32, w64], "reg": l1}, {"params": [low_rank], "reg": bf.Nuclear(lamda=0.1)}],
                     lr=0.1)
    assert opt.backends() == [{}, {}]  # nothing chosen before the first step
    _stepped(opt, [w32, w64, low_rank])
    cpu = torch.device("cpu")
    fused = select("auto", cpu, l1).name  # "cpu" where the extension is built, else "reference"
    assert opt.backend == "auto"
    assert opt.backends() == [{(cpu, torch.float32): fused, (cpu, torch.float64): fused},
                              {(cpu, torch.float32): "reference"}]  # Nuclear has no fused kernel
    from bregman_fused.backends import loader

    if loader.cpu_available():
        assert fused == "cpu"
    opt.load_state_dict(opt.state_dict())
    assert opt.backends() == [{}, {}]  # buckets are rebuilt at the next step
    w64.grad = None  # a param without a grad is in no bucket
    _stepped(opt, [w32, low_rank])
    assert opt.backends()[0] == {(cpu, torch.float32): fused}


def test_backends_of_a_named_backend():
    w = nn.Parameter(torch.randn(5))
    opt = bf.AdaBreg([w], lr=1e-3, reg=bf.L1(lamda=0.1), backend="reference")
    _stepped(opt, [w])
    assert opt.backends() == [{(torch.device("cpu"), torch.float32): "reference"}]


def test_the_readme_example_runs(capsys):
    """The README's param-groups / sparse-init / λ-scheduler script, as written there."""
    pytest.importorskip("torchvision")
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "bf.param_groups(" in b]
    assert len(blocks) == 1
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    opt, masks = scope["opt"], scope["masks"]
    assert [g["name"] for g in opt.param_groups] == ["conv", "linear", "other"]
    assert masks["fc"].float().mean() < 0.05 and masks["conv1"].float().mean() < 0.05  # started sparse
    assert opt.density() < 0.05
    assert len(opt.backends()) == 3 and all(opt.backends())
    assert capsys.readouterr().out.count("epoch") == 2


@pytest.mark.parametrize("wrap", [torch.nn.utils.parametrizations.weight_norm,
                                  torch.nn.utils.parametrizations.spectral_norm])
def test_a_layer_whose_weight_is_computed_is_not_left_unregularized_silently(wrap):
    m = nn.Sequential(wrap(nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="computes its weight from other tensors"):
        bf.param_groups(m, linear=bf.L1(0.1))
    assert [g["name"] for g in bf.param_groups(m)] == ["linear", "other"]  # nothing regularized: fine
