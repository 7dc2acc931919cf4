"""What a benchmark case is made of: the workloads (lists of shapes), the tensors made from them, the
optimizers, dtypes and regularizers by name, their hyper-parameters and the bytes each step must move.

The other benchmark modules import ``bregman_fused`` through this one (``from cases import bf``), so
that a checkout without ``pip install -e .`` finds the package before anything else imports it.
"""
from __future__ import annotations

import math
import os
import sys

import torch

try:
    import bregman_fused as bf
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bregman_fused as bf
from bregman_fused.backends import moments  # noqa: E402  (after the path set-up above)

OPTIMIZERS = ("linbreg", "linbreg-momentum", "adabreg", "proxsgd")
# the optimizers with moments, with compact moments (moments="bf16" / "8bit"): "adabreg-8bit" etc.
COMPACT_OPTIMIZERS = tuple(f"{kind}-{fmt}" for kind in ("linbreg-momentum", "adabreg") for fmt in ("bf16", "8bit"))
ALL_OPTIMIZERS = OPTIMIZERS + COMPACT_OPTIMIZERS
WORKLOADS = ("tiny", "small", "resnet18", "resnet18-channels-last", "many-small", "huge", "list-100m")
# workloads whose 4-D tensors (conv weights) and their grads are stored channels_last
CHANNELS_LAST_WORKLOADS = ("resnet18-channels-last",)
DEFAULT_WORKLOADS = ("resnet18", "many-small", "huge", "list-100m")
GPU_WORKLOADS = ("list-100m",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REGS = ("l1", "group", "none")

# hyper-parameters: typical values (docs/design.md §1); they do not change the memory traffic
LR = {"linbreg": 0.1, "linbreg-momentum": 0.1, "adabreg": 1e-3, "proxsgd": 0.1, "adam": 1e-3, "sgd": 0.1}


def split_kind(kind: str) -> tuple[str, str]:
    """("adabreg", "8bit") for "adabreg-8bit"; (kind, "fp32") for the others."""
    for fmt in ("bf16", "8bit"):
        if kind.endswith("-" + fmt):
            return kind[:-len(fmt) - 1], fmt
    return kind, "fp32"
LAMDA = 1e-3
MOMENTUM = 0.9
BETAS = (0.9, 0.999)
EPS = 1e-8
DELTA = 1.0


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


def bytes_per_elt(optimizer: str, dtype: torch.dtype, params=None) -> float:
    """docs/design.md §2 floors: params/grads in ``dtype``; Bregman states fp32 (torch Adam: param dtype);
    compact moments 2 (bf16) or 1 (8-bit codes; their block scales, 4 B per 256, are not counted).

    ``params``: with compact moments, each param counts in the format its moments are stored in
    (backends/moments.storage: with "8bit", small, 1-D, non-contiguous and short-row params keep
    fp32 moments), weighted by its elements; without them, every param is taken as compact."""
    p = torch.empty((), dtype=dtype).element_size()
    s = 8 if dtype == torch.float64 else 4
    kind, fmt = split_kind(optimizer)

    def floor(moments_format: str) -> int:
        m = {"fp32": s, "bf16": 2, "8bit": 1}[moments_format]  # bytes of one stored moment
        return {
            "linbreg": 2 * p + 2 * s,           # read g, v; write v, θ
            "linbreg-momentum": 2 * p + 2 * s + 2 * m,  # read g, v, m; write m, v, θ
            "adabreg": 2 * p + 2 * s + 4 * m,   # read g, v, m, s; write m, s, v, θ
            "proxsgd": 3 * p,                   # read θ, g; write θ
            "adam": 7 * p,                      # torch fused Adam: read p, g, m, s; write p, m, s
            "sgd": 3 * p,                       # torch SGD (no momentum): read p, g; write p
        }[kind]

    numel = sum(t.numel() for t in params) if params else 0
    if fmt == "fp32" or numel == 0:
        return floor(fmt)
    total = sum(t.numel() * floor(moments.storage(t, fmt)) for t in params)
    return total // numel if total % numel == 0 else total / numel
