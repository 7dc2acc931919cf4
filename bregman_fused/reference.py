"""The spec: one plain-PyTorch step per tensor, in the order DESIGN.md §1 writes the math.

Every fused backend implements the same ``step`` signature and is tested against this one.
Math runs in the states' dtype: float32 for float32/bfloat16/float16 parameters, float64 for
float64 parameters; θ is written back in the parameter's own dtype.
"""
from __future__ import annotations

import math

import torch

from .regularizers import Regularizer

KINDS = ("linbreg", "adabreg", "proxsgd")


def step(
    kind: str,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    duals: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    delta: float,
    reg: Regularizer,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    capturable: bool = False,
) -> torch.Tensor | None:
    """Update ``params`` and their states in place; return the non-zeros of each new θ (int64).

    ``kind``: ``"linbreg"`` (``beta1`` is the momentum β, ``exp_avgs`` its buffers, empty when
    β = 0), ``"adabreg"`` or ``"proxsgd"`` (no dual). ``steps`` are incremented here. With
    ``found_inf`` set to a non-zero value nothing changes and None is returned.

    [note: capturable] ``lr`` may be a float or a one-element tensor. ``capturable=True`` is the
    contract of a step that can be captured in a CUDA graph: the ``steps`` live on the params'
    device, and since knowing whether ``found_inf`` skipped the step would need a host read, the
    return is always the counts, of the unchanged θ after a skipped step. The GPU backends (cuda,
    triton) keep that contract without any host sync; this spec (and the cpu backend) keep the
    same values and return but read lr, the steps and found_inf on the host.
    """
    lr = float(lr)
    if found_inf is not None and bool(found_inf.item()):
        if not capturable:
            return None
        return nonzeros(params)
    for i, p in enumerate(params):
        state_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = grads[i].to(state_dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=state_dtype)
        steps[i] += 1
        if kind == "proxsgd":
            theta = reg.shrink(torch.add(p.to(state_dtype), g, alpha=-lr), lr)
        else:
            v = duals[i]
            if kind == "linbreg":
                if beta1 > 0:
                    m = exp_avgs[i]
                    m.mul_(beta1).add_(g, alpha=(1.0 - beta1) * lr)
                    v.sub_(m)
                else:
                    v.add_(g, alpha=-lr)
            elif kind == "adabreg":
                # the same op sequence as torch.optim.Adam's single-tensor path
                t = float(steps[i].item())
                m, s = exp_avgs[i], exp_avg_sqs[i]
                m.lerp_(g, 1.0 - beta1)
                s.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                step_size = lr / (1.0 - beta1**t)
                bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
                denom = (s.sqrt() / bias_correction2_sqrt).add_(eps)
                v.addcdiv_(m, denom, value=-step_size)
            else:
                raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {KINDS}")
            theta = reg.prox(v, delta)
        p.copy_(theta)
    return nonzeros(params)


def nonzeros(params: list[torch.Tensor]) -> torch.Tensor:
    """The non-zeros of each tensor, as one int64 tensor (on the tensors' device)."""
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([torch.count_nonzero(p) for p in params])
