"""Functional API: one step function per optimizer on lists of tensors, as torch.optim's
``adam``/``sgd`` functions; the optimizer classes step through ``fused_step`` here.

Backend choice happens in ``backends.select`` only: a name (``"auto"``, ``"cpu"``, ...) is
resolved for the tensors' device and regularizer, a ``backends.Backend`` record is used as it is.
Every call applies the step policy of ``backends.contract.begin_step`` (counts, skipped AMP steps)
before the backend runs, and returns the non-zeros of each new θ (int64), or None when a
non-capturable step was skipped because ``found_inf`` is set.
"""
from __future__ import annotations

import torch

from .backends import NAMES as BACKENDS
from .backends import Backend, contract, select
from .backends.contract import Hyper, Kind, StepTensors, state_dtype
from .backends.layout import in_layout_of
from .backends.moments import check_moments
from .backends.moments import to_storage as moments_to_storage
from .regularizers import NoReg, Regularizer

__all__ = ["BACKENDS", "init_states", "fused_step", "linbreg", "adabreg", "proxsgd"]


def fused_step(backend: str | Backend, tensors: StepTensors, hyper: Hyper, reg: Regularizer, *,
               grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
               capturable: bool = False) -> torch.Tensor | None:
    """One step of ``hyper.kind`` over the lists in ``tensors``, on ``backend``."""
    params = tensors.params
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    if not isinstance(backend, Backend):
        backend = select(backend, params[0].device, reg, tensors.moments)
    if not backend.checks_before_writes:  # the reference: checked here, before any count moves
        backend.check(tensors, hyper, grad_scale, found_inf)
    advanced = contract.begin_step(tensors.steps, found_inf, capturable, backend.compiled_op)
    if advanced is None:  # skipped (found_inf): nothing changed
        return None
    try:
        return backend.step(tensors, hyper, reg, grad_scale=grad_scale, found_inf=found_inf if capturable else None,
                            capturable=capturable)
    except Exception:
        if backend.checks_before_writes:  # it refused before writing: take back the counts advanced for it
            contract.undo_step(advanced, found_inf, capturable)
        raise


def init_states(kind: str, params: list[torch.Tensor], *, reg: Regularizer | None = None, delta: float = 1.0,
                momentum: float = 0.0, capturable: bool = False, moments: str = "fp32") -> dict[str, list[torch.Tensor]]:
    """Fresh optimizer states for ``params``, made as the optimizer classes make them at a first step,
    keyed by the argument names of ``linbreg`` / ``adabreg`` / ``proxsgd``, so that e.g.
    ``adabreg(params, grads, **init_states("adabreg", params, reg=reg), lr=1e-3, reg=reg)`` runs.

    dual v = θ/δ + ∂J(θ) (the step then continues from the current θ), moments zero, step counts 0
    (float32; on the params' device when ``capturable``, else on the CPU). States are float64 for
    float64 params, else float32, in the param's memory layout (channels_last stays channels_last).

    ``moments``: the format of the moments (backends/moments.py), the same for every param of the
    call: "bf16", or "8bit" (contiguous params; block scales in ``exp_avg_scales`` etc.). The
    optimizer classes keep fp32 moments for small params with "8bit"; this function does not.
    """
    kind = Kind.parse(kind)
    reg = reg if reg is not None else NoReg()
    states: dict[str, list[torch.Tensor]] = {}
    if kind != Kind.PROXSGD:
        states["duals"] = [in_layout_of(dual_from_theta(p.detach(), reg, delta), p) for p in params]
    if kind == Kind.LINBREG:  # linbreg() takes the list even without momentum (then empty)
        if momentum > 0:
            states.update(_zero_moments(params, "momentum_buffers", True, moments))
        else:
            states["momentum_buffers"] = []
    if kind == Kind.ADABREG:
        states.update(_zero_moments(params, "exp_avgs", True, moments))
        states.update(_zero_moments(params, "exp_avg_sqs", False, moments))
    states["steps"] = [step_count(p, capturable) for p in params]
    return states


def _zero_moments(params: list[torch.Tensor], name: str, signed: bool, fmt: str) -> dict[str, list[torch.Tensor]]:
    """Zero moments of ``params`` in format ``fmt``, keyed ``name`` (and its scales for 8-bit)."""
    check_moments(fmt)
    if fmt == "fp32":
        return {name: [zeros_state(p) for p in params]}
    if fmt == "bf16":
        return {name: [in_layout_of(torch.zeros((), dtype=torch.bfloat16, device=p.device).expand(p.shape), p)
                       for p in params]}
    for i, p in enumerate(params):
        if p.dim() == 0 or not p.is_contiguous():
            raise ValueError(f"params[{i}]: 8-bit moments need a contiguous param of at least one dim (their blocks "
                             f"follow dim-0 rows); got shape {list(p.shape)}, strides {list(p.stride())}")
    stored = [moments_to_storage(torch.zeros(p.shape, device=p.device), fmt, signed) for p in params]
    out = {name: [s for s, _ in stored]}
    if fmt == "8bit":
        out[name[:-1] + "_scales"] = [scale for _, scale in stored]
    return out


def dual_from_theta(theta: torch.Tensor, reg: Regularizer, delta: float) -> torch.Tensor:
    """v = θ/δ + p with p ∈ ∂J(θ): then prox_{δJ}(δ·v) = θ, so a step continues from the current θ."""
    theta = theta.to(state_dtype(theta))
    return theta / delta + reg.subgradient(theta)


def zeros_state(p: torch.Tensor) -> torch.Tensor:
    """A zero moment for p: its state dtype, its memory layout."""
    return in_layout_of(torch.zeros((), dtype=state_dtype(p), device=p.device).expand(p.shape), p)


def step_count(p: torch.Tensor, capturable: bool) -> torch.Tensor:
    """A new float32 step counter: on p's device when capturable (the kernels read and the counts
    advance without a host sync, as in torch's capturable optimizers), else on the CPU."""
    return torch.zeros((), dtype=torch.float32, device=p.device if capturable else "cpu")


def linbreg(params: list[torch.Tensor], grads: list[torch.Tensor], duals: list[torch.Tensor],
            momentum_buffers: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float | torch.Tensor,
            momentum: float = 0.0, delta: float = 1.0, reg: Regularizer | None = None, backend: str = "auto",
            grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
            capturable: bool = False, momentum_buffer_scales: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """LinBreg: m ← β·m + (1−β)·τ·g; v ← v − m (v ← v − τ·g for β = 0); θ ← prox_{δJ}(δ·v).

    Every function here returns the non-zeros of each new θ (None when ``found_inf`` skipped the
    step). ``capturable=True``: ``steps`` (and a tensor ``lr``) live on the params' device, the
    cuda/triton backends read nothing on the host, and the counts are returned even after a skipped
    step (backends/reference.py [note: capturable]). Compact moments (``init_states(moments=...)``)
    are taken as they are stored: bf16 tensors, or 8-bit codes with their ``*_scales``."""
    if momentum > 0 and len(momentum_buffers) != len(params):
        # a fused kernel would otherwise run plain LinBreg without a word
        raise ValueError(f"momentum_buffers must hold one tensor per param when momentum > 0 "
                         f"(got {len(momentum_buffers)} for {len(params)} params)")
    tensors = StepTensors(params, grads, duals, momentum_buffers if momentum > 0 else [], [], steps,
                          list(momentum_buffer_scales or []) if momentum > 0 else [])
    hyper = Hyper.checked(Hyper.linbreg, lr, momentum=momentum, delta=delta)
    return fused_step(backend, tensors, hyper, reg or NoReg(), grad_scale=grad_scale, found_inf=found_inf,
                      capturable=capturable)


def adabreg(params: list[torch.Tensor], grads: list[torch.Tensor], duals: list[torch.Tensor],
            exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *,
            lr: float | torch.Tensor, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
            delta: float = 1.0, reg: Regularizer | None = None, backend: str = "auto",
            grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
            capturable: bool = False, exp_avg_scales: list[torch.Tensor] | None = None,
            exp_avg_sq_scales: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """AdaBreg: Adam moments drive the dual variable; θ ← prox_{δJ}(δ·v)."""
    tensors = StepTensors(params, grads, duals, exp_avgs, exp_avg_sqs, steps, list(exp_avg_scales or []),
                          list(exp_avg_sq_scales or []))
    hyper = Hyper.checked(Hyper.adabreg, lr, beta1=beta1, beta2=beta2, eps=eps, delta=delta)
    return fused_step(backend, tensors, hyper, reg or NoReg(), grad_scale=grad_scale, found_inf=found_inf,
                      capturable=capturable)


def proxsgd(params: list[torch.Tensor], grads: list[torch.Tensor], steps: list[torch.Tensor], *,
            lr: float | torch.Tensor, reg: Regularizer | None = None, backend: str = "auto",
            grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
            capturable: bool = False) -> torch.Tensor | None:
    """ProxSGD: θ ← prox_{τJ}(θ − τ·g)."""
    tensors = StepTensors(params, grads, [], [], [], steps)
    return fused_step(backend, tensors, Hyper.checked(Hyper.proxsgd, lr), reg or NoReg(), grad_scale=grad_scale,
                      found_inf=found_inf, capturable=capturable)
