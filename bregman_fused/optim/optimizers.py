"""LinBreg, AdaBreg and ProxSGD: their arguments, checks and states; the machinery is in base.py."""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from ..backends.contract import Hyper, Kind
from ..regularizers import NoReg, Regularizer
from . import checks, moment_states
from .base import BregmanOptimizer

__all__ = ["LinBreg", "AdaBreg", "ProxSGD"]


def _moment_lists(group: dict, params: list[torch.Tensor], states: list[dict], key: str, field: str,
                  fmt: str) -> dict[str, list[torch.Tensor]]:
    """The bucket's lists of moment ``key`` (StepTensors ``field`` and its scales), each state made
    or converted to the bucket's format first (moment_states.ensure)."""
    for p, s in zip(params, states):
        moment_states.ensure(s, key, p, fmt)
    lists = {field: [s[key] for s in states]}
    if fmt == "8bit":
        lists[_SCALE_FIELD[field]] = [s[key + moment_states.SCALE_SUFFIX] for s in states]
    return lists


_SCALE_FIELD = {"exp_avgs": "exp_avg_scales", "exp_avg_sqs": "exp_avg_sq_scales"}


class LinBreg(BregmanOptimizer):
    """Linearized Bregman iterations (stochastic mirror descent on the elastic net J_δ).

    Args:
        params: parameters or param groups (dicts; a group's ``reg`` is its regularizer).
        lr: learning rate τ (typical ≈ 0.1, like SGD).
        reg: regularizer J (default ``NoReg()``; e.g. ``L1(lamda)``, ``GroupL1L2(lamda)``).
        delta: δ of the elastic net J_δ = J + ‖·‖²/(2δ); θ = prox_{δJ}(δ·v).
        momentum: β > 0 uses the paper's form m ← β·m + (1−β)·τ·g; v ← v − m.
        moments: how the momentum buffer is stored: ``"fp32"`` (default), ``"bf16"`` (stochastic
            rounding) or ``"8bit"`` (block-wise codes; params under 4096 elements, 1-D, with
            dim-0 rows under 16 elements or not contiguous keep fp32); see backends/moments.py. The dual stays float32.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        capturable: keep step counts on the params' device and accept a device tensor lr, so that
            the step can be captured in a CUDA graph.

    With ``reg=NoReg()``, δ = 1 and no momentum this is SGD, equal to torch's to a few ulps (the
    spec rounds every op once; README: The math).
    """

    _kind = Kind.LINBREG
    _moment_keys = ("momentum_buffer",)  # made at the first step with momentum > 0

    def __init__(self, params: Iterable, lr: float = 0.1, reg: Regularizer | None = None, delta: float = 1.0,
                 momentum: float = 0.0, backend: str = "auto", capturable: bool = False, moments: str = "fp32",
                 **torch_keywords: Any):
        defaults = dict(lr=lr, reg=reg if reg is not None else NoReg(), delta=delta, momentum=momentum,
                        capturable=capturable, moments=moments)
        super().__init__(params, defaults, backend, torch_keywords)

    def _check_group(self, group):
        super()._check_group(group)
        checks.in_unit_interval("momentum", group["momentum"])
        checks.check_moments(group)

    def _warn_pitfalls(self, group):
        if group["moments"] != "fp32" and group["momentum"] == 0 and not LinBreg._warned_moments:
            LinBreg._warned_moments = True
            warnings.warn(f"LinBreg(moments={group['moments']!r}) without momentum: there is no momentum buffer to "
                          "store, so the option only acts once momentum > 0 (e.g. set by a scheduler)", UserWarning,
                          stacklevel=4)

    _warned_moments = False

    def _state_signature(self, group):
        # a bool, not the comparison: under torch.compile a changed momentum is a SymFloat, and this
        # signature is kept between steps (a kept SymBool fails the next trace's comparison)
        return (True if group["momentum"] > 0 else False, group["moments"])

    def _uses_moments(self, group):
        return group["momentum"] > 0

    def _state_lists(self, group, params, states, fmt):
        lists = {"duals": [s["dual"] for s in states]}
        if group["momentum"] > 0:
            lists.update(_moment_lists(group, params, states, "momentum_buffer", "exp_avgs", fmt))
        return lists

    def _hyper(self, group):
        return Hyper.linbreg(self._step_lr(group), group["momentum"], group["delta"])


class AdaBreg(BregmanOptimizer):
    """Adam-type Bregman iterations: Adam's bias-corrected moments move the dual variable.

    Args:
        params: parameters or param groups.
        lr: learning rate (Adam's scale: use ≈ 1e-3; at 0.1 every coordinate crosses the threshold
            within a few steps, the net densifies and training diverges).
        reg, delta, backend, capturable: as for ``LinBreg``.
        betas: (β1, β2), Adam's moment coefficients.
        eps: ε added to the denominator.
        moments: how m and s are stored: ``"fp32"`` (default, 12 B of state per fp32 param),
            ``"bf16"`` (stochastic rounding; 8 B, Adam's) or ``"8bit"`` (block-wise codes, ≈ 6 B;
            params under 4096 elements, 1-D, with dim-0 rows under 16 elements or not contiguous
            keep fp32); see backends/moments.py.

    With ``reg=NoReg()`` and δ = 1 this is Adam, equal to torch's to a few ulps (the spec rounds
    every op once; README: The math).
    """

    _kind = Kind.ADABREG
    _moment_keys = _moment_keys_needed = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float = 1e-3, reg: Regularizer | None = None, delta: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, backend: str = "auto",
                 capturable: bool = False, moments: str = "fp32", **torch_keywords: Any):
        defaults = dict(lr=lr, reg=reg if reg is not None else NoReg(), delta=delta, betas=betas, eps=eps,
                        capturable=capturable, moments=moments)
        super().__init__(params, defaults, backend, torch_keywords)

    def _check_group(self, group):
        super()._check_group(group)
        checks.check_betas(group["betas"])
        checks.check_moments(group)
        checks.at_least_zero("eps", group["eps"])

    def _warn_pitfalls(self, group):
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) and float(lr) >= 1e-2 and not AdaBreg._warned_lr:
            AdaBreg._warned_lr = True
            warnings.warn(f"AdaBreg with lr={float(lr):g}: AdaBreg is Adam-type and wants Adam's lr scale, ≈ 1e-3; at "
                          "lr ≥ 1e-2 every weight crosses the threshold within a few steps and the net densifies "
                          "(the digits run at 0.1: > 50 % dense, 20+ points less accurate)", UserWarning, stacklevel=4)

    _warned_lr = False  # warned once per process

    def _state_signature(self, group):
        return (group["moments"],)

    def _uses_moments(self, group):
        return True

    def _state_lists(self, group, params, states, fmt):
        return {"duals": [s["dual"] for s in states],
                **_moment_lists(group, params, states, "exp_avg", "exp_avgs", fmt),
                **_moment_lists(group, params, states, "exp_avg_sq", "exp_avg_sqs", fmt)}

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return Hyper.adabreg(self._step_lr(group), beta1, beta2, group["eps"], group["delta"])


class ProxSGD(BregmanOptimizer):
    """Proximal SGD, the baseline: θ ← prox_{τJ}(θ − τ·g). No dual variable.

    Args:
        params: parameters or param groups.
        lr: learning rate τ.
        reg, backend, capturable: as for ``LinBreg``.
    """

    _kind = Kind.PROXSGD
    _has_dual = False

    def __init__(self, params: Iterable, lr: float = 0.1, reg: Regularizer | None = None, backend: str = "auto",
                 capturable: bool = False, **torch_keywords: Any):
        defaults = dict(lr=lr, reg=reg if reg is not None else NoReg(), capturable=capturable)
        super().__init__(params, defaults, backend, torch_keywords)

    def _state_lists(self, group, params, states, fmt):
        return {}

    def _hyper(self, group):
        return Hyper.proxsgd(self._step_lr(group))
