"""Checkpoints of the Bregman optimizers: torch.optim's format with regularizers as plain data
(``torch.load(..., weights_only=True)`` works) and the optimizer's name, states restored bit for
bit in their own dtype and in their param's layout, on any backend or device.

A checkpoint that does not fit is refused before anything changes, with what it is and what was
expected: another number of groups or params, another optimizer (by the stored name; older
checkpoints without it by their group keys and state keys), a group without ``reg`` or with a
value a step would refuse (the optimizer's own group checks), a regularizer that cannot act on
its params, states of another shape, a step count that is not a whole number >= 0, or a param
whose state lacks a key its optimizer needs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..regularizers import Regularizer, regularizer_from_dict
from . import moment_states
from .checks import own_options
from ..arguments import check_lr_value, check_step_count

FORMAT_KEY = "bregman_fused"  # {"optimizer": class name, "format": 1}


def state_dict(opt, sd: dict[str, Any]) -> dict[str, Any]:
    # plain data instead of Regularizer objects (and of opt.state's tracking dicts): loadable with
    # torch.load(weights_only=True)
    sd["param_groups"] = [{**g, "reg": g["reg"].to_dict()} for g in sd["param_groups"]]
    sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
    sd[FORMAT_KEY] = {"optimizer": type(opt).__name__, "format": 1}
    return sd


def _refuse(opt, what: str) -> None:
    raise ValueError(f"{type(opt).__name__}.load_state_dict: {what}")


def _check_fits(opt, sd: dict[str, Any]) -> list[dict[str, Any]]:
    """Every check, before anything is loaded; returns the groups with their regularizers rebuilt."""
    name = type(opt).__name__
    if not isinstance(sd, dict) or "param_groups" not in sd or "state" not in sd:
        _refuse(opt, "expected a state dict with 'state' and 'param_groups' (from opt.state_dict())")
    saved_name = (sd.get(FORMAT_KEY) or {}).get("optimizer")
    if saved_name is not None and saved_name != name:
        _refuse(opt, f"the checkpoint is of a {saved_name}, this optimizer is a {name}; load it into a {saved_name}")
    saved_groups = sd["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        _refuse(opt, f"the checkpoint has {len(saved_groups)} param groups, this optimizer {len(opt.param_groups)}")
    # checkpoints from before capturable/moments lack them; torch's __setstate__ adds "differentiable"
    # to the defaults of a deep-copied or unpickled optimizer
    required = own_options(opt.defaults) - {"capturable", "moments"}
    groups = []
    for i, (g, current) in enumerate(zip(saved_groups, opt.param_groups)):
        missing = sorted(required - set(g))
        if missing:
            _refuse(opt, f"param group {i} of the checkpoint lacks {missing}: it is not a {name} checkpoint "
                         f"(its keys: {sorted(k for k in g if k != 'params')})")
        if len(g["params"]) != len(current["params"]):
            _refuse(opt, f"param group {i} of the checkpoint has {len(g['params'])} params, this optimizer's "
                         f"{len(current['params'])}")
        g = dict(g)
        reg = g["reg"]
        try:
            # a subclass of the group's own class is rebuilt from the group's object (its math is
            # the subclass's, not that of a built-in class of the same name)
            g["reg"] = regularizer_from_dict(reg, like=current["reg"]) if isinstance(reg, dict) else reg
        except (TypeError, ValueError) as e:
            _refuse(opt, f"param group {i}: {e}")
        if not isinstance(g["reg"], Regularizer):
            _refuse(opt, f"param group {i}: 'reg' is {reg!r}, not a regularizer")
        for p in current["params"]:
            try:
                g["reg"].check_param(p)
            except ValueError as e:
                _refuse(opt, f"param group {i}: the checkpoint's {g['reg']!r} cannot act on a param of shape "
                             f"{list(p.shape)}: {e}")
        g.setdefault("capturable", current["capturable"])
        if "moments" in current:
            # the optimizer's own moments format wins: the checkpoint's moments are converted to it
            g["moments"] = current["moments"]
        try:
            # every value a step checks, checked now: a checkpoint that loads is one that steps
            opt._check_group({**g, "params": current["params"]})
            check_lr_value(g["lr"])  # set here, so checked here (steps do not read a tensor lr)
        except (TypeError, ValueError) as e:
            _refuse(opt, f"param group {i}: {e}")
        groups.append(g)
    saved_state = sd["state"]
    saved_ids = [i for g in groups for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    allowed, needed = opt._state_keys()
    for pid, p in zip(saved_ids, params):
        state = saved_state.get(pid, {})
        if not state:
            continue  # made lazily at the param's next step
        unknown, lacking = sorted(set(state) - allowed), sorted(needed - set(state))
        if unknown or lacking:
            _refuse(opt, f"the state of param {pid} has keys {sorted(state)}, a {name} state has "
                         f"{sorted(needed)}{' and optionally ' + str(sorted(allowed - needed)) if allowed - needed else ''}"
                         " (a checkpoint of another optimizer?)")
        for key, value in state.items():
            if key == "step":
                try:
                    check_step_count(f"state 'step' of param {pid}", value)
                except ValueError as e:
                    _refuse(opt, str(e))
                continue
            if key.endswith(moment_states.SCALE_SUFFIX):
                continue
            if key in opt._moment_keys:
                problem = moment_states.check_stored(key, value, state.get(key + moment_states.SCALE_SUFFIX), p.shape)
                if problem is not None:
                    _refuse(opt, f"param {pid}: {problem}")
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                _refuse(opt, f"state {key!r} of param {pid} is {type(value).__name__}, not a floating-point tensor")
            if value.shape != p.shape:
                _refuse(opt, f"loaded state {key!r} of parameter {pid} has shape {tuple(value.shape)}, but that "
                             f"parameter has shape {tuple(p.shape)}")
    return groups


def load_state_dict(opt, sd: dict[str, Any], torch_load: Callable[[dict[str, Any]], None]) -> None:
    """Check the checkpoint against the optimizer, then load it with torch.optim's ``torch_load``
    and restore the states as they were saved."""
    groups = _check_fits(opt, sd)
    saved_state = sd["state"]
    saved_ids = [i for g in groups for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    group_of = {i: g for g in groups for i in g["params"]}
    # torch casts floating state to the param dtype; our states keep their own dtype (fp32 dual
    # for bf16 params), so they are restored from the saved tensors bit for bit, and the moments go
    # into this optimizer's format (moment_states.restore: bit for bit when it is the checkpoint's,
    # converted otherwise). All of it is made before anything is written: a failure loads nothing.
    restored = []
    for pid, p in zip(saved_ids, params):
        saved, new = saved_state.get(pid, {}), {}
        for key, value in saved.items():
            if key in opt._moment_keys:
                # the group's format even where its step keeps no moments now (LinBreg at momentum
                # 0 keeps its buffer, as a step leaves it, for when momentum returns)
                moment_states.restore(new, saved, key, p, moment_states.target_format(p, group_of[pid]))
            elif not key.endswith(moment_states.SCALE_SUFFIX):
                new[key] = opt._place_state(key, value, p, group_of[pid])
        restored.append((p, new))
    torch_load({k: v for k, v in sd.items() if k != FORMAT_KEY} | {"param_groups": groups})
    for p, new in restored:
        state = opt.state[p]
        for key in [k for k in state if k.endswith(moment_states.SCALE_SUFFIX) and k not in new]:
            del state[key]  # torch's load copied a scale the optimizer's format does not keep
        state.update(new)
