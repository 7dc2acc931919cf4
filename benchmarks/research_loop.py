"""The ``research-loop`` provider: the baseline every speed-up in the benchmark is quoted against.

[note: research loop] This is the paper authors' optimizer step (TimRoith/BregmanLearning,
optimizers.py / regularizers.py) rewritten with its per-step cost kept on purpose: a Python loop over
parameters, out-of-place temporaries for every term (``-lr * grad``, ``delta * v``, sign/abs/clamp in
the prox) and ``p.data = prox(...)``, which allocates a fresh θ every step. It is deliberately NOT
the fused or vectorized way (that is what the other providers are): "speed-up vs research" measures
how much faster a step is than the code the method was published with, so do not tidy this loop
into something faster, and do not share its prox with the package's regularizers.

Two deliberate differences from the original, so that every provider does the same math: AdaBreg
includes the β1 bias correction (the 2024 fix), and states are fp32 for bf16 params (the original
kept them in the param dtype), which costs one extra cast of the gradient and of θ, as a user of
that code adding mixed precision would write.
"""
from __future__ import annotations

import math

import torch

from cases import BETAS, DELTA, EPS, LAMDA, MOMENTUM


def _research_prox(reg_name: str, x: torch.Tensor, t: float, lamda: float) -> torch.Tensor:
    if reg_name == "none":
        return x
    if reg_name == "l1":
        return torch.sign(x) * torch.clamp(torch.abs(x) - t * lamda, min=0)
    # rows of x.flatten(1) (a 1-D tensor: one row per element), as the original reg_l1_l2.prox
    rows = x.view(x.shape[0], -1) if x.dim() > 1 else x.view(-1, 1)
    thresh = t * lamda * math.sqrt(rows.shape[-1])
    ret = torch.clone(rows)
    nx = torch.norm(rows, p=2, dim=1).view(rows.shape[0], 1)
    ind = torch.where(nx != 0)[0]
    ret[ind] = rows[ind] * torch.clamp(1 - torch.clamp(thresh / nx[ind], max=1), min=0)
    return ret.view(x.shape)


def _research_subgrad(reg_name: str, x: torch.Tensor, lamda: float) -> torch.Tensor:
    if reg_name == "none":
        return torch.zeros_like(x)
    if reg_name == "l1":
        return lamda * torch.sign(x)
    rows = x.view(x.shape[0], -1) if x.dim() > 1 else x.view(-1, 1)
    nx = torch.norm(rows, p=2, dim=1).view(rows.shape[0], 1)
    ind = torch.where(nx != 0)[0]
    ret = torch.clone(rows)
    ret[ind] = rows[ind] / nx[ind]
    return (lamda * math.sqrt(rows.shape[-1]) * ret).view(x.shape)


class ResearchLoop(torch.optim.Optimizer):
    """LinBreg (± momentum), AdaBreg and ProxSGD written the research code's way (module docstring)."""

    def __init__(self, params, kind: str, reg_name: str, lr: float):
        super().__init__(params, dict(lr=lr, delta=DELTA, momentum=MOMENTUM if kind == "linbreg-momentum" else 0.0,
                                      betas=BETAS, eps=EPS))
        self.kind, self.reg_name = kind, reg_name

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, delta = group["lr"], group["delta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                if grad.dtype != torch.float32:
                    grad = grad.float()
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    if self.kind != "proxsgd":
                        p_init = p.data.float().clone()
                        state["sub_grad"] = 1 / delta * p_init + _research_subgrad(self.reg_name, p_init, LAMDA)
                    state["momentum_buffer"] = None
                if self.kind == "proxsgd":
                    x = p.data.float()
                    x.add_(-lr * grad)
                    p.data = _research_prox(self.reg_name, x, lr, LAMDA).to(p.dtype)
                    continue
                sub_grad = state["sub_grad"]
                if self.kind == "linbreg":
                    sub_grad.add_(-lr * grad)
                elif self.kind == "linbreg-momentum":
                    momentum = group["momentum"]
                    if state["momentum_buffer"] is None:
                        state["momentum_buffer"] = torch.zeros_like(sub_grad)
                    mom_buff = state["momentum_buffer"]
                    mom_buff.mul_(momentum)
                    mom_buff.add_((1 - momentum) * lr * grad)
                    sub_grad.add_(-mom_buff)
                else:  # adabreg
                    beta1, beta2 = group["betas"]
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(sub_grad)
                        state["exp_avg_sq"] = torch.zeros_like(sub_grad)
                    state["step"] += 1
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    bias_correction1 = 1 - beta1 ** state["step"]
                    bias_correction2 = 1 - beta2 ** state["step"]
                    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                    sub_grad.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
                # a fresh θ every step, as in the original
                p.data = _research_prox(self.reg_name, delta * sub_grad, delta, LAMDA).to(p.dtype)
