"""The providers: the names the benchmark knows, and for each a zero-argument step callable on its
own copy of a case's parameters and gradients (``build_provider``).

This is the only benchmark module that imports ``bregman_fused``'s internals (``backends``,
``functional``); everything else uses its public classes and regularizers.
"""
from __future__ import annotations

from typing import Callable

import torch

from cases import BETAS, DELTA, EPS, LR, MOMENTUM, bf, bytes_per_elt, split_kind
from research_loop import ResearchLoop

# after cases, which puts a checkout without `pip install -e .` on sys.path
from bregman_fused.backends import contract, reference, select
from bregman_fused.functional import init_states

OUR_PROVIDERS = ("research-loop", "reference", "compiled-reference", "cpu", "triton", "cuda")
ANCHOR_PROVIDERS = ("torch-adam-fused", "torch-sgd")
PROVIDERS = OUR_PROVIDERS + ANCHOR_PROVIDERS + ("copy",)
GPU_PROVIDERS = ("triton", "cuda")
# the anchors run their own optimizer; speed-up is quoted against the research loop of the peer
ANCHOR_OPTIMIZER = {"torch-adam-fused": "adam", "torch-sgd": "sgd"}
PEER = {"adam": "adabreg", "sgd": "linbreg"}
# the anchor timed in the same round-robin as our providers of an optimizer: time_vs_anchor
PEER_ANCHOR = {PEER[opt]: provider for provider, opt in ANCHOR_OPTIMIZER.items()}


def peer_anchor(kind: str) -> str | None:
    """The anchor timed beside ``kind`` ("adabreg-8bit" is timed beside torch's fused Adam too)."""
    return PEER_ANCHOR.get(split_kind(kind)[0])


class Skip(Exception):
    """The provider cannot run this case; the message says why."""


def _leaf_params(params, grads):
    out = []
    for p0, g0 in zip(params, grads):
        p = torch.nn.Parameter(p0.clone(), requires_grad=True)
        p.grad = g0.clone()
        out.append(p)
    return out


def _ours(kind: str, params, reg, backend: str):
    kind, moments = split_kind(kind)
    lr = LR[kind]
    if kind in ("linbreg", "linbreg-momentum"):
        return bf.LinBreg(params, lr=lr, reg=reg, delta=DELTA, momentum=MOMENTUM if kind == "linbreg-momentum" else 0.0,
                          backend=backend, moments=moments)
    if kind == "adabreg":
        return bf.AdaBreg(params, lr=lr, reg=reg, delta=DELTA, betas=BETAS, eps=EPS, backend=backend, moments=moments)
    if kind == "proxsgd":
        return bf.ProxSGD(params, lr=lr, reg=reg, backend=backend)
    raise ValueError(f"no optimizer of this project is called {kind!r}")


def _compiled_reference(kind: str, params, grads, reg):
    """torch.compile of a function that counts the step (``contract.begin_step``) and calls
    ``reference.step`` on the lists (states made by ``init_states``, as the optimizer classes make
    them; step counts on the params' device)."""
    import torch._dynamo

    # AdaBreg's reference reads the step count with .item(); capture it instead of breaking the graph
    torch._dynamo.config.capture_scalar_outputs = True
    # hyper-parameters are constants of a case; as symbolic floats, torch 2.14 hits "Guard failed on the
    # same frame it was created" for the momentum coefficient (1 - β)·lr
    if hasattr(torch._dynamo.config, "specialize_float"):
        torch._dynamo.config.specialize_float = True
    # one graph per (kind, dtype, workload) case; the default limit of 8 is too low for a full run
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    ref_kind = "linbreg" if kind == "linbreg-momentum" else kind
    momentum = MOMENTUM if kind == "linbreg-momentum" else 0.0
    with torch.no_grad():
        ps = [p.clone() for p in params]
        gs = [g.clone() for g in grads]
        states = init_states(ref_kind, ps, reg=reg, delta=DELTA, momentum=momentum, capturable=True)
    m = states.get("momentum_buffers") or states.get("exp_avgs", [])  # the contract's exp_avgs hold both
    tensors = contract.StepTensors(ps, gs, states.get("duals", []), m, states.get("exp_avg_sqs", []), states["steps"])
    hyper = {"linbreg": lambda: contract.Hyper.linbreg(LR[kind], momentum, DELTA),
             "adabreg": lambda: contract.Hyper.adabreg(LR[kind], BETAS[0], BETAS[1], EPS, DELTA),
             "proxsgd": lambda: contract.Hyper.proxsgd(LR[kind])}[ref_kind]()

    def step_fn(tensors):
        contract.begin_step(tensors.steps, None, True, False)  # capturable: device-side counts, no host read
        return reference.step(tensors, hyper, reg)

    compiled = torch.compile(step_fn)

    @torch.no_grad()
    def step():
        compiled(tensors)

    return step


def build_provider(provider: str, kind: str, params, grads, reg, reg_name: str) -> Callable[[], object]:
    """Return a zero-argument step function; raise Skip with the reason if it cannot run here."""
    device = params[0].device
    if provider == "copy":
        nbytes = round(bytes_per_elt(kind, params[0].dtype, params) * sum(p.numel() for p in params))
        n = (nbytes + 7) // 8  # src and dst each hold half the bytes: a copy reads one, writes the other
        src = torch.randn(n, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    if kind in PEER and provider not in ANCHOR_OPTIMIZER:  # it would run one of ours in its place
        anchor = next(a for a, opt in ANCHOR_OPTIMIZER.items() if opt == kind)
        raise ValueError(f"provider {provider!r} runs this project's optimizers; {kind!r} is torch's, timed by the "
                         f"provider {anchor!r}")
    moments = split_kind(kind)[1]
    if moments != "fp32" and provider in ("research-loop", "compiled-reference"):
        raise Skip(f"{provider} has fp32 moments only")
    if provider == "research-loop":
        return ResearchLoop(_leaf_params(params, grads), kind, reg_name, LR[kind]).step
    if provider == "compiled-reference":
        return _compiled_reference(kind, params, grads, reg)
    if provider == "torch-adam-fused":
        try:
            opt = torch.optim.Adam(_leaf_params(params, grads), lr=LR["adam"], betas=BETAS, eps=EPS, fused=True)
        except RuntimeError as e:
            raise Skip(f"torch.optim.Adam(fused=True) refused: {e}") from None
        return opt.step
    if provider == "torch-sgd":
        return torch.optim.SGD(_leaf_params(params, grads), lr=LR["sgd"]).step
    backend = provider
    if provider != "reference":
        try:
            select(backend, device, reg, moments)
        except RuntimeError as e:
            raise Skip(str(e)) from None
    return _ours(kind, _leaf_params(params, grads), reg, backend).step
