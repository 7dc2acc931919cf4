"""The spec: one plain-PyTorch step per tensor, in the order docs/design.md §1 writes the math.

Every fused backend implements the same ``step`` contract (backends/contract.py) and is tested
against this one. Math runs in the states' dtype (``contract.state_dtype``); θ is written back in
the parameter's own dtype.
"""
from __future__ import annotations

import torch

from ..regularizers import Regularizer
from . import moments, rounding
from .contract import Hyper, Kind, StepTensors, state_dtype


@torch.no_grad()  # it writes params in place, as the fused ops do: also leaves that require grad
def step(tensors: StepTensors, hyper: Hyper, reg: Regularizer, *, grad_scale: torch.Tensor | None = None,
         found_inf: torch.Tensor | None = None, capturable: bool = False) -> torch.Tensor:
    """Update the params and their states in place; return the non-zeros of each new θ (int64).

    It computes tensor by tensor and checks nothing itself: its caller, ``functional.fused_step``,
    runs ``contract.check_tensors`` first (call it yourself when you call this directly).

    The step counts were already incremented (``contract.begin_step``); AdaBreg reads them for its
    bias corrections. ``found_inf`` only reaches a backend in capturable steps: when it is set,
    nothing changes and the counts of the unchanged θ are returned.

    [note: capturable] ``hyper.lr`` may be a float or a one-element tensor. A capturable step can
    be captured in a CUDA graph: the step counts live on the params' device and nothing is read on
    the host. The GPU backends (cuda, triton) keep that contract without any host sync; this spec
    (and the cpu backend) compute the same values and return but read lr, the counts and found_inf
    on the host.
    """
    params, grads, duals, exp_avgs, exp_avg_sqs, steps = tensors[:6]
    if found_inf is not None and bool(found_inf.item()):
        return nonzeros(params)
    lr = float(hyper.lr)
    prox_sgd, linbreg = hyper.kind == Kind.PROXSGD, hyper.kind == Kind.LINBREG
    # per-step constants, read once (the loop runs per tensor: thousands of them in a big model)
    one_minus_beta1, one_minus_beta2, mom_scale = hyper.one_minus_beta1, hyper.one_minus_beta2, hyper.mom_scale
    momentum, delta = hyper.momentum, hyper.delta
    compact = hyper.uses_exp_avg and tensors.moments != "fp32"  # moments.py: decode, fp32 update, encode
    for i, p in enumerate(params):
        dtype = state_dtype(p)
        g = grads[i].to(dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=dtype)
        if prox_sgd:
            theta = reg.shrink(p.to(dtype).sub(g.mul(lr)), lr)
        else:
            v = duals[i]
            if linbreg:
                if momentum:
                    m = _decoded(tensors, i, signed=True) if compact else exp_avgs[i]
                    m.mul_(hyper.beta1).add_(g.mul(mom_scale))
                    v.sub_(m)
                    if compact:
                        _store(tensors, i, m, None)
                else:
                    v.sub_(g.mul(lr))
            else:
                t = float(steps[i].item())  # per tensor: under torch.compile a data-dependent value
                if compact:
                    m, s = _decoded(tensors, i, signed=True), _decoded(tensors, i, signed=False)
                else:
                    m, s = exp_avgs[i], exp_avg_sqs[i]
                # no lerp/addcmul/addcdiv/alpha and a correctly rounded √: rounding.py [note: spec roundings]
                rounding.lerp_(m, g, one_minus_beta1)
                s.mul_(hyper.beta2).add_(g.mul(one_minus_beta2).mul_(g))
                root = rounding.sqrt(s)
                denom = rounding.div(root, hyper.bc2_sqrt(t)).add_(hyper.eps)
                v.sub_(m.div(denom).mul_(hyper.step_size(t)))
                if compact:
                    _store(tensors, i, m, (s, root))
            theta = reg.prox(v, delta)
        p.copy_(theta)
    return nonzeros(params)


def _decoded(tensors: StepTensors, i: int, signed: bool) -> torch.Tensor:
    """Moment i of a compact call as a new float32 tensor (moments.py)."""
    stored = tensors.exp_avgs[i] if signed else tensors.exp_avg_sqs[i]
    scale = (tensors.exp_avg_scales if signed else tensors.exp_avg_sq_scales) or None
    return moments.to_float(stored, scale[i] if scale else None, signed)


def _store(tensors: StepTensors, i: int, m: torch.Tensor, s_and_root) -> None:
    """Write the new float32 moments of tensor i in the call's compact format: bf16 stochastically
    rounded with the step count's random bits, or 8-bit codes and block scales (s coded by √s)."""
    # the count as a tensor, not a Python int: under torch.compile an int taken from a float
    # tensor's .item() reaches inductor's integer hash as a float and fails to compile
    step = tensors.steps[i].reshape(()).to(torch.int64)
    if tensors.moments == "bf16":
        tensors.exp_avgs[i].copy_(moments.round_bf16(m, step, moments.SR_STREAM_M))
        if s_and_root is not None:
            tensors.exp_avg_sqs[i].copy_(moments.round_bf16(s_and_root[0], step, moments.SR_STREAM_S))
        return
    moments.encode_m(m, tensors.exp_avgs[i], tensors.exp_avg_scales[i])
    if s_and_root is not None:
        moments.encode_s(s_and_root[1], tensors.exp_avg_sqs[i], tensors.exp_avg_sq_scales[i])


def nonzeros(params: list[torch.Tensor]) -> torch.Tensor:
    """The non-zeros of each tensor, as one int64 tensor (on the tensors' device)."""
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([torch.count_nonzero(p) for p in params])
