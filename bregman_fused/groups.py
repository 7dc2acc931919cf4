"""``param_groups``: the param groups almost every model gets, built from its module types.

Conv weights (``nn.Conv{1,2,3}d`` and the transposed convs) take one regularizer (typically
``KernelL1L2``), Linear weights another (``L1`` or ``GroupL1L2``), and everything else (biases,
norm scales, embeddings, custom parameters) a third, by default none. Writing this by hand is where
the silent mistakes happen, so the helper refuses them instead:

- a parameter shared by two modules of different types (e.g. an embedding tied to the Linear head)
  would belong to two groups: refused, naming both places;
- one regularizer object (with a λ) given for two groups: a λ scheduler on one group would change the other's
  λ without re-initialising its duals (θ would jump): refused, pass one instance per group;
- a regularizer that cannot act on a parameter's shape (``KernelL1L2`` on a Linear weight):
  refused here, naming the layer, rather than later by the optimizer without one;
- an empty group (no convs in an MLP) is left out: torch refuses groups without parameters.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .regularizers import NoReg, Regularizer

__all__ = ["param_groups", "GROUP_NAMES"]

GROUP_NAMES = ("conv", "linear", "other")  # the groups' "name" keys, in the order they are returned

_CONV = nn.modules.conv._ConvNd  # Conv1d/2d/3d, ConvTranspose1d/2d/3d and their lazy forms


def _kind(module: nn.Module, name: str) -> str:
    if name == "weight" and isinstance(module, _CONV):
        return "conv"
    if name == "weight" and isinstance(module, nn.Linear):
        return "linear"
    return "other"


def _check_reg(arg: str, reg: Any) -> Regularizer:
    if reg is None:
        return NoReg()
    if isinstance(reg, type) and issubclass(reg, Regularizer):
        raise TypeError(f"param_groups: {arg}={reg.__name__} is the class; pass an instance, e.g. "
                        f"{arg}={reg.__name__}(lamda=1e-3)")
    if not isinstance(reg, Regularizer):
        raise TypeError(f"param_groups: {arg}={reg!r} is not a bregman_fused regularizer (e.g. bf.L1(lamda=1e-3)); "
                        "None leaves those parameters unregularized")
    return reg


def param_groups(model: nn.Module, *, conv: Regularizer | None = None, linear: Regularizer | None = None,
                 other: Regularizer | None = None) -> list[dict[str, Any]]:
    """Param groups for a Bregman optimizer: conv weights, Linear weights, everything else.

    Args:
        model: the model; every parameter of ``model.parameters()`` lands in exactly one group
            (frozen ones included: a parameter without a grad is skipped by the step).
        conv: regularizer of the weights of ``nn.Conv*d`` / ``nn.ConvTranspose*d`` layers, e.g.
            ``bf.KernelL1L2(lamda=0.1)``; None leaves them unregularized.
        linear: regularizer of the weights of ``nn.Linear`` layers (and subclasses), e.g.
            ``bf.L1(lamda=0.1)``; None leaves them unregularized.
        other: regularizer of every other parameter (biases, norm layers, embeddings, custom
            parameters); None (the default) leaves them unregularized.

    Returns:
        ``[{"params": [...], "reg": reg, "name": "conv"}, {... "linear"}, {... "other"}]`` in that
        order, without the groups that would be empty. Each group carries its ``reg`` (``NoReg()``
        for None), so the optimizer's own ``reg=`` does not reach these groups. Pass the list to
        ``bf.LinBreg`` / ``bf.AdaBreg`` / ``bf.ProxSGD``; ``name`` tells the groups apart (e.g. to find
        the ``group_index`` of a ``bf.LamdaScheduler``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be a torch.nn.Module, got {type(model).__name__}")
    regs = {"conv": _check_reg("conv", conv), "linear": _check_reg("linear", linear),
            "other": _check_reg("other", other)}
    params: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    seen: dict[int, tuple[str, str]] = {}  # id(param) -> (its group, where it was first found)
    for module_name, module in model.named_modules():
        layer = "conv" if isinstance(module, _CONV) else "linear" if isinstance(module, nn.Linear) else None
        if layer and not isinstance(regs[layer], NoReg) and (parametrize.is_parametrized(module, "weight")
                                                              or "weight" not in module._parameters):
            # its weight is computed (parametrizations, the old weight_norm's weight_g/weight_v) from
            # tensors that would land in "other"; which of them to regularize is the user's call
            raise ValueError(f"param_groups: {module_name!r} ({type(module).__name__}) computes its weight from "
                             f"other tensors ({', '.join(n for n, _ in module.named_parameters()) or 'none'}); which "
                             f"of them {layer}= should regularize is not for param_groups to guess: build these "
                             "groups by hand")
        for name, p in module.named_parameters(recurse=False):
            where = f"{module_name}.{name}" if module_name else name
            kind = _kind(module, name)
            if id(p) in seen:  # a parameter shared between modules (tied weights)
                first_kind, first_where = seen[id(p)]
                if first_kind != kind:
                    raise ValueError(f"param_groups: parameter {first_where!r} is also {where!r}: it would be in "
                                     f"group {first_kind!r} and in group {kind!r}; build these groups by hand "
                                     "and decide which regularizer the tied parameter gets")
                continue
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(f"param_groups: {where!r} of a lazy module is not initialised yet; run one forward "
                                 "pass before building the param groups")
            try:
                regs[kind].check_param(p)
            except ValueError as e:
                raise ValueError(f"param_groups: {kind}={type(regs[kind]).__name__} cannot act on {where!r} "
                                 f"({type(module).__name__}, shape {list(p.shape)}): {e}") from None
            seen[id(p)] = (kind, where)
            params[kind].append(p)
    groups = [{"params": params[name], "reg": regs[name], "name": name} for name in GROUP_NAMES if params[name]]
    _refuse_shared_regs(groups)
    return groups


def _refuse_shared_regs(groups: list[dict[str, Any]]) -> None:
    """One regularizer object with a strength in two groups: refused (see the module doc)."""
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if a["reg"] is b["reg"] and a["reg"]._params():
                raise ValueError(f"param_groups: {a['name']}= and {b['name']}= are the same {type(a['reg']).__name__} "
                                 "object; pass one instance per group (a λ scheduler on one group would change the "
                                 "other's λ without re-initialising its duals)")
