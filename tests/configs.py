"""The cross-check table: every backend is run against the reference on these configs.

One config = optimizer × regularizer × dtype × shape. Backends import ``CONFIGS`` (or build a
smaller table with ``make_configs``) and call ``run_and_compare``; nothing backend-specific lives
here. Tolerances are derived from the reference's own error in the tested dtype (see
``tolerance``), never hand-picked per case.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch

import bregman_fused as bf

# (name, optimizer class, hyper-parameters). lr values are large enough that coordinates cross the
# thresholds in both directions within a few steps.
OPTIMIZERS = {
    "linbreg": (bf.LinBreg, dict(lr=0.1, delta=1.3)),
    "linbreg_momentum": (bf.LinBreg, dict(lr=0.1, delta=0.7, momentum=0.8)),
    "adabreg": (bf.AdaBreg, dict(lr=0.05, delta=1.1, betas=(0.8, 0.95), eps=1e-6)),
    "proxsgd": (bf.ProxSGD, dict(lr=0.1)),
}

# name -> (factory, which shapes it accepts)
REGULARIZERS: dict[str, tuple[Callable[[], bf.Regularizer], Callable[[tuple], bool]]] = {
    "none": (lambda: bf.NoReg(), lambda s: True),
    "l1": (lambda: bf.L1(lamda=0.25), lambda s: True),
    "l1pos": (lambda: bf.L1Pos(lamda=0.25), lambda s: True),
    "group": (lambda: bf.GroupL1L2(lamda=0.08), lambda s: True),
    "kernel": (lambda: bf.KernelL1L2(lamda=0.1), lambda s: len(s) >= 3),
    "sparse_group": (lambda: bf.SparseGroupL1L2(lamda_l1=0.1, lamda_group=0.05), lambda s: True),
    "nuclear": (lambda: bf.Nuclear(lamda=0.2), lambda s: len(s) >= 2),
}

# odd sizes on purpose: empty, one element, primes, 1023, conv weights, long and short rows
SHAPES = [(0,), (1,), (7,), (1023,), (3, 0), (13, 7), (5, 37), (2, 3, 5, 5), (6, 4, 3, 3), (4, 1, 1, 1)]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# Memory layouts besides contiguous, and the shapes each is tried on. A dense layout (transposed,
# channels_last, outer_transposed) is walked by the kernels as it is stored when the row maps allow
# it (a row-map's groups must stay blocks of consecutive memory), else it is copied; "strided" is
# never dense (every other element of a wider buffer) and is always copied (backends/layout.py [note: dense views]).
LAYOUT_SHAPES = {
    "transposed": [(9, 6), (3, 2, 3, 5)],
    "channels_last": [(3, 2, 3, 5), (2, 3, 1, 4)],  # the second: a size-1 dim whose stride ties another
    "outer_transposed": [(3, 2, 3, 5)],  # dims 0 and 1 swapped in memory: KernelL1L2's kernels stay blocks
    "strided": [(13, 7)],
}


@dataclasses.dataclass(frozen=True)
class Config:
    optimizer: str
    reg: str
    dtype: torch.dtype
    shape: tuple
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        layout = "" if self.layout == "contiguous" else f"-{self.layout}"
        return f"{self.optimizer}-{self.reg}-{dt}-{'x'.join(map(str, self.shape))}{layout}"


def make_configs(optimizers=None, regs=None, dtypes=None, shapes=None, layouts=LAYOUT_SHAPES) -> list[Config]:
    out = []
    for opt, reg, dtype, shape in itertools.product(
        optimizers or OPTIMIZERS, regs or REGULARIZERS, dtypes or DTYPES, shapes or SHAPES
    ):
        if REGULARIZERS[reg][1](shape):
            out.append(Config(opt, reg, dtype, shape))
    # params, grads and states in other layouts: every kernel must see the same coordinates
    for opt, reg, dtype in itertools.product(optimizers or OPTIMIZERS, regs or REGULARIZERS, dtypes or DTYPES):
        for layout, layout_shapes in layouts.items():
            for shape in layout_shapes:
                if REGULARIZERS[reg][1](shape):
                    out.append(Config(opt, reg, dtype, shape, layout))
    return out


CONFIGS = make_configs()
NUM_STEPS = 5


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in the memory layout ``layout`` (see LAYOUT_SHAPES)."""
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "transposed":  # all dims reversed in memory; reversing is its own inverse
        order = tuple(reversed(range(t.dim())))
        return t.permute(order).contiguous().permute(order)
    if layout == "outer_transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(layout)


def inputs(cfg: Config, num_steps: int = NUM_STEPS, seed: int = 0):
    """Initial θ and the gradient of every step, all in cfg.dtype (contiguous; ``run`` lays them out)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(cfg.shape, generator=gen, dtype=torch.float64).to(cfg.dtype) * 0.5
    if cfg.reg == "l1pos":
        theta = theta.abs()
    # a few exact zeros in θ₀, as in a sparse init
    if theta.numel():
        mask = torch.rand(cfg.shape, generator=gen) < 0.3
        theta = theta.masked_fill(mask, 0)
    grads = [torch.randn(cfg.shape, generator=gen, dtype=torch.float64).to(cfg.dtype) for _ in range(num_steps)]
    return theta, grads


def run(cfg: Config, backend: str, device="cpu", dtype=None, num_steps: int = NUM_STEPS, seed: int = 0):
    """Run ``num_steps`` steps; return (θ, state dict of that param, optimizer). ``dtype`` overrides
    cfg.dtype (used for the float64 reference of a float32 run: the same inputs, upcast)."""
    theta0, grads = inputs(cfg, num_steps, seed)
    dtype = dtype or cfg.dtype
    cls, hyper = OPTIMIZERS[cfg.optimizer]
    p = torch.nn.Parameter(in_layout(theta0.to(device=device, dtype=dtype), cfg.layout))
    assert cfg.layout == "contiguous" or p.dim() < 2 or not p.is_contiguous(), cfg.id
    opt = cls([p], reg=REGULARIZERS[cfg.reg][0](), backend=backend, **hyper)
    for g in grads:
        p.grad = in_layout(g.to(device=device, dtype=dtype), cfg.layout)
        opt.step()
    return p.detach(), opt.state[p], opt


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tolerance(ref_lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """A backend may be off the float64 reference by at most twice the reference's own error in
    ``dtype`` plus a few units of rounding of that dtype at the tensor's scale."""
    if ref64.numel() == 0:
        return 0.0
    own_error = (ref_lowp.double() - ref64.double()).abs().max().item()
    scale = max(1.0, ref64.double().abs().max().item())
    return 2.0 * own_error + 8.0 * _ulp(dtype) * scale


STATE_KEYS = ("dual", "momentum_buffer", "exp_avg", "exp_avg_sq")
ROW_MAPS = ("group", "kernel", "sparse_group")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns: signs of zeros and NaN payloads included (torch.equal takes −0.0 for +0.0
    and no NaN for equal)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    view = ints[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def assert_matches_reference(cfg: Config, backend: str, device="cpu", num_steps: int = NUM_STEPS):
    """The check every backend runs: params AND every state tensor after ``num_steps`` steps."""
    theta, state, opt = run(cfg, backend, device, num_steps=num_steps)
    ref_theta, ref_state, _ = run(cfg, "reference", "cpu", num_steps=num_steps)
    ref64_theta, ref64_state, _ = run(cfg, "reference", "cpu", dtype=torch.float64, num_steps=num_steps)

    theta = theta.cpu()
    assert theta.dtype == cfg.dtype and theta.shape == torch.Size(cfg.shape)
    tol = tolerance(ref_theta, ref64_theta, cfg.dtype)
    err = (theta.double() - ref64_theta).abs().max().item() if theta.numel() else 0.0
    assert err <= tol, f"{cfg.id} [{backend}] θ off the float64 reference by {err:.3g} > tol {tol:.3g}"

    assert set(state) == set(ref_state), f"{cfg.id} [{backend}] state keys {set(state)} != {set(ref_state)}"
    assert float(state["step"]) == float(ref_state["step"]) == num_steps
    for key in STATE_KEYS:
        if key not in ref_state:
            continue
        got = state[key].cpu()
        assert got.dtype == ref_state[key].dtype, f"{cfg.id} [{backend}] {key} dtype {got.dtype}"
        tol = tolerance(ref_state[key], ref64_state[key], ref_state[key].dtype)
        err = (got.double() - ref64_state[key]).abs().max().item() if got.numel() else 0.0
        assert err <= tol, f"{cfg.id} [{backend}] {key} off the float64 reference by {err:.3g} > tol {tol:.3g}"

    # [note: exact spec] In the same dtype the backends compute the reference's bits: the spec
    # rounds every op once, as the kernels do (backends/rounding.py [note: spec roundings]). Not
    # covered: θ of the row maps (each kernel sums the row norms in its own order), float64
    # AdaBreg (the reference's float64 sqrt is ATen's, which is not correctly rounded on the CPU),
    # and θ of bf16 params in Triton's interpreter, which converts float32 to bfloat16 by truncation
    # (compiled Triton rounds to nearest even, as torch does).
    if not (cfg.optimizer == "adabreg" and cfg.dtype == torch.float64):
        for key in STATE_KEYS:
            if key in ref_state:
                assert same_bits(state[key].cpu(), ref_state[key]), f"{cfg.id} [{backend}] {key}: not the reference's bits"
        if cfg.reg not in ROW_MAPS and not (backend == "triton" and device == "cpu" and cfg.dtype == torch.bfloat16):
            assert same_bits(theta, ref_theta), f"{cfg.id} [{backend}] θ: not the reference's bits (signs of zeros too)"

    # the kernels' non-zero counts must be exact for the θ they wrote
    counts = opt._nonzeros()
    (p,) = opt.param_groups[0]["params"]
    assert int(counts[p]) == int(torch.count_nonzero(p)), f"{cfg.id} [{backend}] non-zero count"


def backend_step(backend, kind, params, grads, duals, exp_avgs, exp_avg_sqs, steps, *, reg, lr, beta1=0.0, beta2=0.0,
                 eps=0.0, delta=1.0, **amp):
    """One step of ``kind`` on ``backend`` over raw lists, through the functional layer (which
    applies the step-count policy), for tests that drive a backend without an optimizer."""
    from bregman_fused.backends.contract import Hyper, Kind, StepTensors

    return bf.functional.fused_step(backend, StepTensors(params, grads, duals, exp_avgs, exp_avg_sqs, steps),
                                    Hyper(Kind.parse(kind), lr, beta1, beta2, eps, delta), reg, **amp)
