"""λ scheduler: steer one param group's regularization strength toward a target density.

The paper's discrepancy rule: after a warm-up, every ``cooldown + 1`` calls compare the group's
density with the target; too dense → stronger λ, too sparse → weaker λ. The step is additive
(λ ± step, clipped at ``min_lamda``) or multiplicative (λ·factor or λ/factor).

Changing λ changes the map v ↦ θ = prox_{δJ}(δ·v): with the old dual, θ would jump (a larger λ
shrinks every weight at once). So after the change the duals are re-initialised from the current
θ (``opt.reinit_dual(group_index)``: v = θ/δ + ∂J_new(θ)), and θ — and the next step — continue from
the same weights. [note: why reinit]

The research code's scheduler wrote ``reg.mu`` after the regularizers had renamed it to ``lamda``:
Python created a new attribute, λ never changed, and nothing complained. Here λ is only changed
through names the regularizer reports in ``_params()`` (``Regularizer.scale_strength`` for the
multiplicative step); an unknown name raises ``AttributeError`` when the scheduler is built and
again at every write.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from . import distributed as dist_utils

__all__ = ["LamdaScheduler", "set_strength"]


def set_strength(reg, name: str, value: float) -> None:
    """Set the regularizer strength ``name`` (e.g. ``"lamda"``) to ``value``, refusing unknown names."""
    known = reg._params()
    if name not in known:
        raise AttributeError(
            f"{type(reg).__name__} has no regularization strength {name!r}; its strengths are {sorted(known)}"
        )
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name}: {value} (must be a finite number >= 0)")
    setattr(reg, name, value)
    if reg._params()[name] != value:  # the attribute must be the one the regularizer uses
        raise AttributeError(f"setting {type(reg).__name__}.{name} did not change its strength")


class LamdaScheduler:
    """Adapt the λ of ``opt.param_groups[group_index]`` toward ``target_density``.

    Args:
        opt: a LinBreg / AdaBreg / ProxSGD optimizer.
        group_index: the param group whose regularizer is scheduled.
        target_density: wanted fraction of non-zeros of that group's parameters.
        warmup: number of first calls that change nothing.
        cooldown: calls skipped after each update (update every ``cooldown + 1`` calls).
        mode: ``"additive"`` (λ ± step) or ``"multiplicative"`` (λ·factor / λ÷factor; all strengths of
            the regularizer scale together via ``reg.scale_strength``).
        step: the additive increment (paper: 0.05).
        factor: the multiplicative factor (> 1).
        attr: which strength to change in additive mode; default the regularizer's only one
            (``"lamda"``); needed for SparseGroupL1L2 (``"lamda_l1"`` or ``"lamda_group"``).
        min_lamda, max_lamda: bounds for the scheduled strength ``attr`` (both modes): a step stops
            at a bound and never moves λ away from the direction the density asks for.

    Call ``scheduler.step()`` once per epoch (or pass the density yourself: ``step(density)``).
    """

    def __init__(self, opt, group_index: int = 0, *, target_density: float, warmup: int = 0, cooldown: int = 0,
                 mode: str = "additive", step: float = 0.05, factor: float = 2.0, attr: str | None = None,
                 min_lamda: float = 0.0, max_lamda: float = math.inf):
        if not 0 <= group_index < len(opt.param_groups):
            raise IndexError(f"group_index {group_index} out of range: the optimizer has "
                             f"{len(opt.param_groups)} param groups")
        if not 0.0 <= float(target_density) <= 1.0:
            raise ValueError(f"Invalid target_density: {target_density} (must be in [0, 1])")
        if int(warmup) < 0 or int(cooldown) < 0:
            raise ValueError(f"warmup and cooldown must be >= 0 (got {warmup}, {cooldown})")
        if mode not in ("additive", "multiplicative"):
            raise ValueError(f"Invalid mode: {mode!r}; expected 'additive' or 'multiplicative'")
        if mode == "additive" and not (math.isfinite(step) and step > 0):
            raise ValueError(f"Invalid step: {step} (must be > 0)")
        if mode == "multiplicative" and not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"Invalid factor: {factor} (must be > 1)")
        if not 0.0 <= min_lamda <= max_lamda:
            raise ValueError(f"Invalid bounds: min_lamda={min_lamda}, max_lamda={max_lamda}")
        self.opt = opt
        self.group_index = group_index
        self.target_density = float(target_density)
        self.warmup = int(warmup)
        self.cooldown = int(cooldown)
        self.mode = mode
        self.step_size = float(step)
        self.factor = float(factor)
        self.min_lamda = float(min_lamda)
        self.max_lamda = float(max_lamda)
        strengths = self.reg._params()
        if not strengths:
            raise ValueError(f"param group {group_index} has {self.reg!r}: no regularization strength to schedule")
        if attr is None:
            if mode == "additive" and len(strengths) > 1:
                raise ValueError(f"{type(self.reg).__name__} has several strengths {sorted(strengths)}; "
                                 "pass attr= to choose the one to schedule")
            attr = next(iter(strengths))
        if attr not in strengths:  # the research code's `mu` bug: fail now, not silently every epoch
            raise AttributeError(f"{type(self.reg).__name__} has no regularization strength {attr!r}; "
                                 f"its strengths are {sorted(strengths)}")
        self.attr = attr
        self.calls = 0  # calls to step() so far
        self.cooldown_left = 0  # calls still to skip before the next update

    @property
    def group(self) -> dict[str, Any]:
        return self.opt.param_groups[self.group_index]

    @property
    def reg(self):
        return self.group["reg"]

    @property
    def lamda(self) -> float:
        """Current value of the scheduled strength."""
        return float(self.reg._params()[self.attr])

    @torch.no_grad()
    def group_density(self) -> float:
        """The group's fraction of non-zeros, over all ranks for DTensor (FSDP2) params (a collective
        then, as ``opt.density()``): each rank must see the same density, or each would set its own λ."""
        params = self.group["params"]
        nnz = dist_utils.global_sum([(float(torch.count_nonzero(dist_utils.local(p))), p) for p in params])
        total = dist_utils.global_sum([(float(dist_utils.local(p).numel()), p) for p in params])
        return nnz / total if total else 0.0

    def step(self, density: float | None = None) -> bool:
        """One scheduler call (e.g. per epoch). Returns True if λ was changed."""
        self.calls += 1
        if self.calls <= self.warmup:
            return False
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return False
        self.cooldown_left = self.cooldown
        density = self.group_density() if density is None else float(density)
        if density > self.target_density:
            up = True
        elif density < self.target_density:
            up = False
        else:
            return False
        old = self.lamda
        if self.mode == "multiplicative" and old == 0.0:
            raise ValueError(f"multiplicative λ scheduling cannot move {self.attr} away from 0; "
                             "start from λ > 0 or use mode='additive'")
        if self.mode == "additive":
            wanted = old + (self.step_size if up else -self.step_size)
        else:
            wanted = old * (self.factor if up else 1.0 / self.factor)
        # the bounds stop λ, in both modes; they never move it the other way (a λ set outside them
        # by hand stays until the density asks to move it toward them)
        new = min(wanted, max(self.max_lamda, old)) if up else max(wanted, min(self.min_lamda, old))
        if new == old:
            return False
        if self.mode == "additive":
            set_strength(self.reg, self.attr, new)
        else:  # every strength by the same factor, the one that puts attr at new
            self.reg.scale_strength(new / old)
        # [note: why reinit] keep θ: recompute the duals for the new λ from the current weights
        self.opt.reinit_dual(self.group_index)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Counters and settings (the λ values themselves live in the optimizer's state_dict)."""
        return {**{key: getattr(self, key) for key in (
            "group_index", "target_density", "warmup", "cooldown", "mode", "step_size", "factor", "attr",
            "min_lamda", "max_lamda", "calls", "cooldown_left")}, "group_name": self.group.get("name")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters and settings. The scheduled group stays this scheduler's: a checkpoint of
        one that steered another group (another index, or a group of another ``name``) is refused,
        as is an unknown key; nothing is set before every check passed."""
        state_dict = dict(state_dict)
        own = self.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        if unknown:
            raise KeyError(f"unexpected key(s) {unknown} in LamdaScheduler state_dict")
        saved_index = state_dict.get("group_index", self.group_index)
        saved_name = state_dict.get("group_name", own["group_name"])
        if saved_index != self.group_index or saved_name != own["group_name"]:
            raise ValueError(f"the checkpoint's LamdaScheduler steered param group {saved_index} ({saved_name!r}), this "
                             f"one steers group {self.group_index} ({own['group_name']!r}): construct it with the "
                             "group_index of the group it should steer")
        attr = state_dict.get("attr", self.attr)
        if attr not in self.reg._params():
            raise AttributeError(f"{type(self.reg).__name__} has no regularization strength {attr!r}")
        state_dict.pop("group_name", None)
        for key, value in state_dict.items():
            setattr(self, key, value)
