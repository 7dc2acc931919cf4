#!/usr/bin/env python
"""Optimizer-step benchmark: time per step, effective GB/s, % of copy bandwidth, speed-up.

Every provider updates its own copy of the same parameters with the same gradients; providers of
one (workload, dtype, optimizer) case are measured interleaved (one step each, round-robin, the
order rotated every repetition) so that drifting clocks or a noisy neighbour hit them alike.

    python benchmarks/bench_step.py                      # everything that can run here
    python benchmarks/bench_step.py --quick              # CI-size smoke run (tiny workload)
    python benchmarks/bench_step.py --workloads resnet18 --dtypes fp32 \
        --providers research-loop,reference,cpu,torch-adam-fused,copy

Byte counts are the floors of DESIGN.md §2 (the traffic a perfect fused kernel moves), so
"GB/s" is effective bandwidth: bytes/elt × numel / median time. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

try:
    import bregman_fused as bf
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bregman_fused as bf
from bregman_fused import reference
from bregman_fused.functional import select_backend

OUR_PROVIDERS = ("research-loop", "reference", "compiled-reference", "cpu", "triton", "cuda")
ANCHOR_PROVIDERS = ("torch-adam-fused", "torch-sgd")
PROVIDERS = OUR_PROVIDERS + ANCHOR_PROVIDERS + ("copy",)
GPU_PROVIDERS = ("triton", "cuda")
OPTIMIZERS = ("linbreg", "linbreg-momentum", "adabreg", "proxsgd")
# the anchors run their own optimizer; speed-up is quoted against the research loop of the peer
ANCHOR_OPTIMIZER = {"torch-adam-fused": "adam", "torch-sgd": "sgd"}
PEER = {"adam": "adabreg", "sgd": "linbreg"}
# the anchor timed in the same round-robin as our providers of an optimizer: time_vs_anchor
PEER_ANCHOR = {PEER[opt]: provider for provider, opt in ANCHOR_OPTIMIZER.items()}
WORKLOADS = ("tiny", "small", "resnet18", "resnet18-channels-last", "many-small", "huge", "list-100m")
# workloads whose 4-D tensors (conv weights) and their grads are stored channels_last
CHANNELS_LAST_WORKLOADS = ("resnet18-channels-last",)
DEFAULT_WORKLOADS = ("resnet18", "many-small", "huge", "list-100m")
GPU_WORKLOADS = ("list-100m",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REGS = ("l1", "group", "none")

# hyper-parameters: typical values (DESIGN.md §1); they do not change the memory traffic
LR = {"linbreg": 0.1, "linbreg-momentum": 0.1, "adabreg": 1e-3, "proxsgd": 0.1, "adam": 1e-3, "sgd": 0.1}
LAMDA = 1e-3
MOMENTUM = 0.9
BETAS = (0.9, 0.999)
EPS = 1e-8
DELTA = 1.0

CSV_COLUMNS = [
    "date_utc", "machine", "cpu_model", "cpu_cores", "torch_threads", "gpu_name", "torch_version",
    "triton_version", "bregman_fused_version", "git_commit",
    "provider", "optimizer", "reg", "workload", "n_tensors", "numel", "dtype", "state_dtype", "device",
    "bytes_per_elt", "warmup", "reps", "loadavg_1m", "median_ms", "p20_ms", "p80_ms", "gb_s", "copy_gb_s",
    "pct_of_copy", "speedup_vs_research", "time_vs_anchor", "setup_s", "status", "note",
    # CUDA only: the step's GPU time with its host work hidden, and the host time of the call;
    # `timing` says which time gb_s, pct_of_copy and the ratios use ("device" on CUDA, else "wall")
    "timing", "device_ms", "device_p20_ms", "device_p80_ms", "host_ms",
]


# ------------------------------------------------------------------------------------------------
# workloads: lists of shapes
# ------------------------------------------------------------------------------------------------
def _transformer_shapes(d: int = 1024, layers: int = 8) -> list[tuple[int, ...]]:
    """≈100 M elements as a realistic list: 8 pre-LN transformer blocks of width 1024 (97 tensors)."""
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,)]


def workload_shapes(name: str) -> list[tuple[int, ...]]:
    if name == "tiny":  # smoke tests: odd sizes included
        return [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,), (1,), (1023,)]
    if name == "small":  # pytest-benchmark suite: ≈0.42 M elements in 12 tensors
        return [(64, 3, 7, 7), (64,), (64,), (64, 64, 3, 3), (64,), (64,), (128, 64, 3, 3), (128,), (128,),
                (256, 128, 3, 3), (256,), (10, 256)]
    if name in ("resnet18", "resnet18-channels-last"):
        import torchvision

        # CIFAR-10 head as in the paper's ResNet-18 runs: 11.18 M elements, 62 tensors
        with torch.device("meta"):
            model = torchvision.models.resnet18(num_classes=10)
        return [tuple(p.shape) for p in model.parameters()]
    if name == "many-small":
        return [(1024,)] * 2000
    if name == "huge":
        return [(64 * 2**20,)]
    if name == "list-100m":
        return _transformer_shapes()
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


def make_tensors(shapes, dtype, device, seed=0, channels_last=False):
    """Parameters (roughly like a trained net's weights) and gradients, in ``dtype``; with
    ``channels_last`` the 4-D ones are stored channels_last (as ``model.to(memory_format=...)`` does,
    and autograd lays their grads out alike)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params, grads = [], []
    for shape in shapes:
        n = math.prod(shape)
        scale = 1.0 / math.sqrt(max(n // shape[0], 1)) if len(shape) > 1 else 0.1
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        params.append((torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype, memory_format=fmt))
        grads.append((torch.randn(shape, generator=gen) * 1e-2).to(device=device, dtype=dtype, memory_format=fmt))
    return params, grads


def make_reg(name: str):
    return {"l1": lambda: bf.L1(lamda=LAMDA), "group": lambda: bf.GroupL1L2(lamda=LAMDA), "none": bf.NoReg}[name]()


def bytes_per_elt(optimizer: str, dtype: torch.dtype) -> int:
    """DESIGN.md §2 floors: params/grads in ``dtype``; Bregman states fp32 (torch Adam: param dtype)."""
    p = torch.empty((), dtype=dtype).element_size()
    s = 8 if dtype == torch.float64 else 4
    return {
        "linbreg": 2 * p + 2 * s,           # read g, v; write v, θ
        "linbreg-momentum": 2 * p + 4 * s,  # read g, v, m; write m, v, θ
        "adabreg": 2 * p + 6 * s,           # read g, v, m, s; write m, s, v, θ
        "proxsgd": 3 * p,                   # read θ, g; write θ
        "adam": 7 * p,                      # torch fused Adam: read p, g, m, s; write p, m, s
        "sgd": 3 * p,                       # torch SGD (no momentum): read p, g; write p
    }[optimizer]


# ------------------------------------------------------------------------------------------------
# the research code's way [note: research loop]
# ------------------------------------------------------------------------------------------------
# Mirrors the per-step cost of the paper authors' optimizers (TimRoith/BregmanLearning,
# optimizers.py / regularizers.py), rewritten: a Python loop over parameters, out-of-place
# temporaries for every term (`-lr * grad`, `delta * v`, sign/abs/clamp in the prox) and
# `p.data = prox(...)`, which allocates a fresh θ every step. Two deliberate differences, so that
# every provider does the same math: AdaBreg includes the β1 bias correction (the 2024 fix), and
# states are fp32 for bf16 params (the original kept them in the param dtype), which costs one
# extra cast of the gradient and of θ, as a user of that code adding mixed precision would write.
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
    """LinBreg (± momentum), AdaBreg and ProxSGD written the research code's way (see note above)."""

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


# ------------------------------------------------------------------------------------------------
# providers: build one and get back a step callable
# ------------------------------------------------------------------------------------------------
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
    lr = LR[kind]
    if kind in ("linbreg", "linbreg-momentum"):
        return bf.LinBreg(params, lr=lr, reg=reg, delta=DELTA, momentum=MOMENTUM if kind == "linbreg-momentum" else 0.0,
                          backend=backend)
    if kind == "adabreg":
        return bf.AdaBreg(params, lr=lr, reg=reg, delta=DELTA, betas=BETAS, eps=EPS, backend=backend)
    return bf.ProxSGD(params, lr=lr, reg=reg, backend=backend)


def _compiled_reference(kind: str, params, grads, reg):
    """torch.compile of a function that calls ``reference.step`` on the lists (states built as the
    optimizer classes build them)."""
    import torch._dynamo

    # AdaBreg's reference reads the step count with .item(); capture it instead of breaking the graph
    torch._dynamo.config.capture_scalar_outputs = True
    # hyper-parameters are constants of a case; as symbolic floats, torch 2.14 hits "Guard failed on the
    # same frame it was created" for the momentum coefficient (1 - β)·lr
    if hasattr(torch._dynamo.config, "specialize_float"):
        torch._dynamo.config.specialize_float = True
    # one graph per (kind, dtype, workload) case; the default limit of 8 is too low for a full run
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    with torch.no_grad():
        ps = [p.clone() for p in params]
        gs = [g.clone() for g in grads]
        theta = [p.to(torch.float32) for p in ps]
        duals = [] if kind == "proxsgd" else [(t / DELTA + reg.subgradient(t)).contiguous() for t in theta]
        has_m = kind in ("linbreg-momentum", "adabreg")
        m = [torch.zeros_like(t) for t in theta] if has_m else []
        s = [torch.zeros_like(t) for t in theta] if kind == "adabreg" else []
        steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in ps]
    ref_kind = "linbreg" if kind == "linbreg-momentum" else kind
    hyper = dict(lr=LR[kind], beta1=MOMENTUM if kind == "linbreg-momentum" else (BETAS[0] if kind == "adabreg" else 0.0),
                 beta2=BETAS[1] if kind == "adabreg" else 0.0, eps=EPS if kind == "adabreg" else 0.0, delta=DELTA)

    def step_fn(ps, gs, duals, m, s, steps):
        return reference.step(ref_kind, ps, gs, duals, m, s, steps, reg=reg, **hyper)

    compiled = torch.compile(step_fn)

    @torch.no_grad()
    def step():
        compiled(ps, gs, duals, m, s, steps)

    return step


def build_provider(provider: str, kind: str, params, grads, reg, reg_name: str) -> Callable[[], object]:
    """Return a zero-argument step function; raise Skip with the reason if it cannot run here."""
    device = params[0].device
    if provider == "copy":
        nbytes = bytes_per_elt(kind, params[0].dtype) * sum(p.numel() for p in params)
        n = (nbytes + 7) // 8  # src and dst each hold half the bytes: a copy reads one, writes the other
        src = torch.randn(n, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
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
            select_backend(backend, device, reg)
        except RuntimeError as e:
            raise Skip(str(e)) from None
    return _ours(kind, _leaf_params(params, grads), reg, backend).step


# ------------------------------------------------------------------------------------------------
# machine info
# ------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, str]:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    try:  # the installed distribution's version; importing triton itself takes seconds
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:  # not installed: the column stays empty
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:
        commit = ""
    cores = os.cpu_count() or 0
    slug = gpu if gpu else f"{cpu_model}-{cores}c"
    return {
        "machine": re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-"),
        "cpu_model": cpu_model,
        "cpu_cores": str(cores),
        "torch_threads": str(torch.get_num_threads()),
        "gpu_name": gpu,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "bregman_fused_version": bf.__version__,
        "git_commit": commit,
    }


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------
def _loadavg() -> str:
    """1-minute load average when the case starts: other processes on the machine skew timings."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


class DeviceTimer:
    """GPU time of one step with its host work hidden: a spin kernel (torch.cuda._sleep) keeps the
    GPU busy while the host issues the step, so the events around the step time only the GPU's
    work, as when a training loop has queued the forward and backward ahead of the optimizer."""

    _instance: "DeviceTimer | None" = None

    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        cycles = 1_000_000
        torch.cuda._sleep(cycles)  # warm up
        rates = []
        for _ in range(5):
            torch.cuda.synchronize()
            self.start.record()
            torch.cuda._sleep(cycles)
            self.end.record()
            self.end.synchronize()
            rates.append(cycles / (self.start.elapsed_time(self.end) * 1e-3))
        self.cycles_per_s = statistics.median(rates)

    @classmethod
    def get(cls) -> "DeviceTimer":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def time(self, fn: Callable[[], object], hide_s: float) -> tuple[float, float]:
        """(device seconds, host seconds) of one call of ``fn``; ``hide_s``: how long the GPU is
        kept busy ahead of it (more than the host needs to issue the step)."""
        torch.cuda.synchronize()
        torch.cuda._sleep(int(self.cycles_per_s * hide_s))
        self.start.record()
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e-3, host


def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a sorted list."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def finish_row(row: dict, numel: int, walls: list[float], device_times: list[float], host_times: list[float],
               hidden: int) -> None:
    """Fill a row's times and bandwidth from its repetitions (seconds). ``hidden``: how many of the
    device timings had the host's work covered by the spin kernel."""
    walls = sorted(walls)
    row.update(reps=len(walls), median_ms=f"{statistics.median(walls) * 1e3:.4f}",
               p20_ms=f"{_percentile(walls, 0.2) * 1e3:.4f}", p80_ms=f"{_percentile(walls, 0.8) * 1e3:.4f}")
    # the time the bandwidth and the ratios to the copy and the anchor are quoted for: on CUDA
    # the GPU's own time, since the wall time of a synchronized step adds the host's launch
    # work, which a training loop overlaps with the GPU work queued before the step
    med = row["_wall"] = statistics.median(walls)
    row["timing"] = "wall"
    if device_times:
        dts = sorted(device_times)
        row.update(device_ms=f"{statistics.median(dts) * 1e3:.4f}", device_p20_ms=f"{_percentile(dts, 0.2) * 1e3:.4f}",
                   device_p80_ms=f"{_percentile(dts, 0.8) * 1e3:.4f}",
                   host_ms=f"{statistics.median(host_times) * 1e3:.4f}")
        if hidden >= 0.8 * len(dts):
            row["timing"] = "device"
            med = statistics.median(dts)
        else:  # the step waited for the GPU (a host read) or outlasted the spin: gaps inside device_ms
            row["note"] = (row["note"] + " host work not hidden (the step reads from the GPU): "
                           "ratios and GB/s from wall time").strip()
    row["gb_s"] = f"{row['bytes_per_elt'] * numel / med / 1e9:.3f}"
    row["_median"] = med


def run_case(workload, dtype_name, kind, providers, args, device, info, log) -> list[dict]:
    """Measure all ``providers`` of one (workload, dtype, optimizer) case, interleaved."""
    dtype = DTYPES[dtype_name]
    shapes = workload_shapes(workload)
    params, grads = make_tensors(shapes, dtype, device, channels_last=workload in CHANNELS_LAST_WORKLOADS)
    numel = sum(p.numel() for p in params)
    reg = make_reg(args.reg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    rows: dict[str, dict] = {}
    steps: dict[str, Callable] = {}
    for provider in providers:
        opt_name = ANCHOR_OPTIMIZER.get(provider, kind)
        row = dict(date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **info,
                   provider=provider, optimizer=opt_name, reg=args.reg if provider not in ANCHOR_OPTIMIZER else "",
                   workload=workload, n_tensors=len(shapes), numel=numel, dtype=dtype_name,
                   state_dtype=dtype_name if provider in ANCHOR_OPTIMIZER else "fp32", device=str(device),
                   bytes_per_elt=bytes_per_elt(opt_name, dtype), warmup=args.warmup, loadavg_1m=_loadavg(),
                   status="ok", note="")
        rows[provider] = row
        if provider == "compiled-reference" and len(shapes) > args.compile_max_tensors:
            row.update(status="skipped", note=f"{len(shapes)} tensors > --compile-max-tensors {args.compile_max_tensors}: "
                       "torch.compile unrolls the per-tensor loop and compiling takes too long")
            continue
        try:
            t0 = time.perf_counter()
            fn = build_provider(provider, kind, params, grads, reg, args.reg)
            fn()  # first step: lazy state init, compilation
            sync()
            for _ in range(args.warmup):
                fn()
            sync()
            row["setup_s"] = f"{time.perf_counter() - t0:.3f}"
            steps[provider] = fn
        except Skip as e:
            row.update(status="skipped", note=str(e))
        except Exception as e:  # report a failing provider in its row and go on with the others
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")
            row.update(status="error", note=msg[:300])
            log(f"  ! {provider} failed: {msg[:300]}")
    del params, grads

    times: dict[str, list[float]] = {p: [] for p in steps}
    device_times: dict[str, list[float]] = {p: [] for p in steps}
    host_times: dict[str, list[float]] = {p: [] for p in steps}
    hidden: dict[str, int] = {p: 0 for p in steps}  # reps whose host work the spin kernel covered
    device_timer = DeviceTimer.get() if device.type == "cuda" else None
    order = list(steps)
    t_start = time.perf_counter()
    reps = 0
    for rep in range(args.reps):
        k = rep % max(len(order), 1)
        for provider in order[k:] + order[:k]:
            fn = steps[provider]
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            wall = time.perf_counter() - t0
            times[provider].append(wall)
            if device_timer is not None:
                hide_s = 2 * wall + 2e-4
                dev, host = device_timer.time(fn, hide_s=hide_s)
                device_times[provider].append(dev)
                host_times[provider].append(host)
                hidden[provider] += host < hide_s
        reps += 1
        if reps >= args.min_reps and time.perf_counter() - t_start > args.max_time:
            break

    for provider, ts in times.items():
        finish_row(rows[provider], numel, ts, device_times[provider], host_times[provider], hidden[provider])
    if reps < args.reps and times:
        for provider in times:
            rows[provider]["note"] = (rows[provider]["note"] + f" stopped after {reps} reps (--max-time {args.max_time:g} s)").strip()

    # within this case: % of the copy bandwidth (a rate, so it applies to an anchor's own byte
    # count too), speed-up over the research loop, and time relative to the peer anchor
    copy = rows.get("copy")
    research = rows.get("research-loop")
    anchor = next((rows[p] for p in rows if p in ANCHOR_OPTIMIZER and "_median" in rows[p]), None)
    for provider, row in rows.items():
        if "_median" not in row:
            continue
        if copy is not None and "_median" in copy:
            copy_gbs = float(copy["gb_s"])
            row["copy_gb_s"] = f"{copy_gbs:.3f}"
            row["pct_of_copy"] = f"{100 * float(row['gb_s']) / copy_gbs:.1f}"
        if research is not None and "_median" in research:
            # wall time both: the research loop reads from the GPU every step, so its host work
            # is never hidden, and the comparison is of whole synchronized steps
            row["speedup_vs_research"] = f"{research['_wall'] / row['_wall']:.2f}"
            if provider in ANCHOR_OPTIMIZER:
                row["note"] = (row["note"] + f" speed-up vs research-loop {kind}").strip()
        if anchor is not None and provider != "copy":
            key = "_median" if row["timing"] == anchor["timing"] else "_wall"
            row["time_vs_anchor"] = f"{row[key] / anchor[key]:.3f}"
    return list(rows.values())


def run_anchor_case(workload, dtype_name, provider, args, device, info, log, research_median) -> list[dict]:
    """An anchor (torch Adam / SGD) interleaved with a copy of its own byte count."""
    kind = ANCHOR_OPTIMIZER[provider]
    rows = run_case(workload, dtype_name, kind, [provider, "copy"], args, device, info, log)
    anchor = rows[0]
    copy = rows[1]
    copy["optimizer"] = kind
    copy["bytes_per_elt"] = bytes_per_elt(kind, DTYPES[dtype_name])
    if "_median" in anchor and "_median" in copy:
        anchor["copy_gb_s"] = copy["gb_s"]
        anchor["pct_of_copy"] = f"{100 * float(anchor['gb_s']) / float(copy['gb_s']):.1f}"
        copy["copy_gb_s"] = copy["gb_s"]
        copy["pct_of_copy"] = "100.0"
    if "_median" in anchor and research_median:
        anchor["speedup_vs_research"] = f"{research_median / anchor['_wall']:.2f}"
        anchor["note"] = (anchor["note"] + f" speed-up vs research-loop {PEER[kind]}").strip()
    return rows


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
TABLE = [("provider", 18), ("optimizer", 16), ("workload", 22), ("dtype", 5), ("B/elt", 5), ("reps", 4),
         ("median ms", 10), ("p20 ms", 10), ("p80 ms", 10), ("device ms", 10), ("host ms", 8), ("GB/s", 7),
         ("% copy", 6), ("speed-up", 8),
         ("vs torch", 8), ("note", 0)]


def format_row(r: dict) -> str:
    vals = [r["provider"], r["optimizer"], r["workload"], r["dtype"], str(r["bytes_per_elt"]), str(r.get("reps", "")),
            r.get("median_ms", ""), r.get("p20_ms", ""), r.get("p80_ms", ""), r.get("device_ms", ""),
            r.get("host_ms", ""), r.get("gb_s", ""),
            r.get("pct_of_copy", ""), (r["speedup_vs_research"] + "x") if r.get("speedup_vs_research") else "",
            (r["time_vs_anchor"] + "x") if r.get("time_vs_anchor") else "",
            (r["status"] + ": " if r["status"] != "ok" else "") + r.get("note", "")]
    out = []
    for (name, width), v in zip(TABLE, vals):
        if width == 0:
            out.append(v[:160])
        elif name in ("provider", "optimizer", "workload", "dtype"):
            out.append(f"{v:<{width}}")
        else:
            out.append(f"{v:>{width}}")
    return "  ".join(out)


def table_header() -> str:
    return "  ".join(f"{n:<{w}}" if n in ("provider", "optimizer", "workload", "dtype") else (f"{n:>{w}}" if w else n)
                     for n, w in TABLE)


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_COLUMNS:
            raise SystemExit(f"{path} has other columns than this version writes; pass another --csv path")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _csv_list(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)} (comma-separated) or 'all'")
        return items

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", type=_csv_list(PROVIDERS), default=None,
                    help=f"comma-separated subset of {', '.join(PROVIDERS)} (default: all)")
    ap.add_argument("--workloads", type=_csv_list(WORKLOADS), default=None,
                    help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: {', '.join(DEFAULT_WORKLOADS)}; "
                         "list-100m only on GPU)")
    ap.add_argument("--dtypes", type=_csv_list(tuple(DTYPES)), default=None, help="fp32,bf16 (default: both)")
    ap.add_argument("--optimizers", type=_csv_list(OPTIMIZERS), default=None,
                    help=f"comma-separated subset of {', '.join(OPTIMIZERS)} (default: all)")
    ap.add_argument("--reg", choices=REGS, default="l1", help="regularizer of our optimizers (default: l1)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the tensors live (default: cuda if available, else cpu)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per provider (default 30; --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 3; --quick 1)")
    ap.add_argument("--min-reps", type=int, default=5, help="never stop a case before this many reps (default 5)")
    ap.add_argument("--max-time", type=float, default=120.0,
                    help="stop a case's timed loop after this many seconds once --min-reps are done (default 120)")
    ap.add_argument("--compile-max-tensors", type=int, default=256,
                    help="skip compiled-reference on workloads with more tensors than this (default 256)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's default). On a shared, busy CPU "
                         "use 1: with every core taken, each parallel region waits for a descheduled thread")
    ap.add_argument("--csv", default=None, help="CSV path (default: benchmarks/results/<machine>-<date>.csv; rows are appended)")
    ap.add_argument("--no-csv", action="store_true", help="print the table only")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke preset: workload tiny, fp32, 5 reps, 1 warm-up, all providers except "
                         "compiled-reference (explicit options still win)")
    args = ap.parse_args(argv)
    if args.quick:
        args.workloads = args.workloads or ["tiny"]
        args.dtypes = args.dtypes or ["fp32"]
        args.providers = args.providers or [p for p in PROVIDERS if p != "compiled-reference"]
        args.reps = args.reps if args.reps is not None else 5
        args.warmup = args.warmup if args.warmup is not None else 1
        args.min_reps = min(args.min_reps, args.reps)
    args.providers = args.providers or list(PROVIDERS)
    args.workloads = args.workloads or list(DEFAULT_WORKLOADS)
    args.dtypes = args.dtypes or list(DTYPES)
    args.optimizers = args.optimizers or list(OPTIMIZERS)
    args.reps = args.reps if args.reps is not None else 30
    args.warmup = args.warmup if args.warmup is not None else 3
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(device)

    def log(msg: str) -> None:
        print(msg, flush=True)

    providers = list(args.providers)
    workloads = list(args.workloads)
    if device.type != "cuda":
        gpu_p = [p for p in providers if p in GPU_PROVIDERS]
        gpu_w = [w for w in workloads if w in GPU_WORKLOADS]
        why = "no CUDA device here (torch.cuda.is_available() is False)" if not torch.cuda.is_available() \
            else "this run is on --device cpu"
        if gpu_p:
            log(f"GPU providers skipped ({', '.join(gpu_p)}): {why}")
        if gpu_w:
            log(f"GPU workloads skipped ({', '.join(gpu_w)}): {why}")
        providers = [p for p in providers if p not in GPU_PROVIDERS]
        workloads = [w for w in workloads if w not in GPU_WORKLOADS]
    ours = [p for p in providers if p in OUR_PROVIDERS or p == "copy"]
    if not any(p in OUR_PROVIDERS for p in providers):
        ours = []
    anchors = [p for p in providers if p in ANCHOR_PROVIDERS]

    log(f"# {info['cpu_model']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
        + (f", {info['gpu_name']}" if info["gpu_name"] else "")
        + f"; torch {info['torch_version']}, triton {info['triton_version'] or '-'}; device {device}; reg {args.reg}; "
          f"reps {args.reps}, warm-up {args.warmup}")
    if device.type == "cuda":
        log("# median/p20/p80 ms: wall time of a synchronized step (host + GPU); device ms: the GPU's time with the "
            "host's work hidden (GB/s, % copy and the ratios use it); host ms: the host's time to issue the step")
    load, cores = _loadavg(), os.cpu_count() or 1
    if device.type == "cpu" and load and float(load) > cores and torch.get_num_threads() > 1:
        log(f"# WARNING: load average {load} on {cores} cores: multi-threaded CPU timings will be distorted "
            "(other processes hold the cores); consider --threads 1")
    log(table_header())
    all_rows: list[dict] = []
    csv_path = None if args.no_csv else (args.csv or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"{info['machine']}-{_dt.datetime.now(_dt.timezone.utc).date().isoformat()}.csv"))

    def emit(rows: list[dict]) -> None:
        # rows go to the CSV case by case: an interrupted run keeps what it measured
        for r in rows:
            log(format_row(r))
        if csv_path:
            write_csv(csv_path, rows)
        all_rows.extend(rows)

    for workload in workloads:
        for dtype_name in args.dtypes:
            research_medians: dict[str, float] = {}
            timed_beside: set[str] = set()
            if ours:
                for kind in args.optimizers:
                    # the peer anchor (torch Adam for AdaBreg, SGD for LinBreg) joins the round-robin:
                    # ratios to it are measured side by side, under the same machine conditions
                    peer = PEER_ANCHOR.get(kind)
                    beside = [peer] if peer in anchors else []
                    timed_beside.update(beside)
                    rows = run_case(workload, dtype_name, kind, ours + beside, args, device, info, log)
                    for r in rows:
                        if r["provider"] == "research-loop" and "_median" in r:
                            research_medians[kind] = r["_wall"]
                    emit(rows)
                    gc.collect()
            for provider in (p for p in anchors if p not in timed_beside):
                kind = ANCHOR_OPTIMIZER[provider]
                rows = run_anchor_case(workload, dtype_name, provider, args, device, info, log,
                                       research_medians.get(PEER[kind]))
                emit(rows)
                gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if csv_path:
        log(f"# {len(all_rows)} rows -> {csv_path}")
    return all_rows


if __name__ == "__main__":
    main()
