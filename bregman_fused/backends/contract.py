"""The contract between the optimizers and the backends, written once (docs/design.md §5).

* ``Kind`` and ``RegCode``: the optimizer and regularizer codes shared with csrc/bregman_math.h
  (``enum class Kind`` / ``enum class Reg``) and the Triton kernels (tests/test_contract.py
  compares them).
* ``state_dtype``: the dtype of every optimizer state of a param.
* ``Hyper``: one step's hyper-parameters, frozen, with the derived per-tensor constants addressed
  by name; the names are those of ``bregman::StepParams`` and of the Triton hyper table's columns.
* ``StepTensors``: the lists one backend call updates.
* ``begin_step``: the step-count and skipped-step (AMP ``found_inf``) policy of every backend.

Every backend exposes ``step(tensors, hyper, reg, *, grad_scale=None, found_inf=None,
capturable=False)`` (``reference.step`` is the spec) and is only called through
``bregman_fused.functional``, after ``begin_step``: backends read the step counts, they never
count or decide to skip themselves.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..arguments import at_least_zero, check_lr_tensor, check_lr_value, finite, in_unit_interval, positive
from ..regularizers import Regularizer, runs_builtin_map
from .moments import format_of as moments_format_of
from .moments import scale_shape as moments_scale_shape

__all__ = ["Kind", "RegCode", "fused_code", "state_dtype", "Hyper", "StepTensors", "check_amp", "check_tensors",
           "begin_step", "undo_step", "StepFn"]


class Kind(enum.IntEnum):
    """Optimizer codes (bregman::Kind)."""

    LINBREG = 0
    ADABREG = 1
    PROXSGD = 2

    @classmethod
    def parse(cls, kind: "str | Kind") -> "Kind":
        if isinstance(kind, Kind):
            return kind
        try:
            return cls[str(kind).upper()]
        except KeyError:
            raise ValueError(f"Invalid kind: {kind!r}; expected one of {[k.label for k in cls]}") from None

    @property
    def label(self) -> str:
        """The name used by the functional API and in messages: "linbreg", "adabreg", "proxsgd"."""
        return self.name.lower()


class RegCode(enum.IntEnum):
    """Regularizer codes of the fused kernels (bregman::Reg), keyed by ``Regularizer.kind``."""

    NONE = 0
    L1 = 1
    L1POS = 2
    GROUP = 3
    SPARSE_GROUP = 4

    @classmethod
    def of(cls, reg_kind: str) -> "RegCode | None":
        """The code of a regularizer kind, None for kinds no fused kernel implements (nuclear)."""
        return _REG_CODE_OF_KIND.get(reg_kind)

    @property
    def is_row_map(self) -> bool:
        """Couples whole rows (group norms): the row kernels, and shards must keep rows whole."""
        return self in (RegCode.GROUP, RegCode.SPARSE_GROUP)


# Regularizer.kind -> code, a plain dict (torch.compile traces dict lookups, not enum internals)
_REG_CODE_OF_KIND = {code.name.lower(): code for code in RegCode}


def fused_code(reg: Regularizer) -> RegCode | None:
    """The code of the map a fused kernel would run for ``reg``; None when no kernel may run it:
    kinds without a kernel (Nuclear) and subclasses that may have changed the math (a kernel would
    silently run the built-in map instead of their ``shrink``, regularizers.Regularizer)."""
    return RegCode.of(reg.kind) if runs_builtin_map(reg) else None


def state_dtype(param: torch.Tensor | torch.dtype) -> torch.dtype:
    """Optimizer states are float64 for float64 params, else float32 (for float32/bf16/fp16 params
    the dual is the master copy of θ, so it keeps full precision)."""
    dtype = param if isinstance(param, torch.dtype) else param.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Hyper:
    """One step's hyper-parameters. ``lr`` is a float, or a one-element tensor in capturable steps.

    The derived constants are computed in double exactly as the reference does, and rounded once
    to the compute type by each kernel (csrc/bregman_math.h ``make_step_params``). For LinBreg
    ``beta1`` is the momentum β; unused fields stay at their defaults."""

    kind: Kind
    lr: float | torch.Tensor
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    delta: float = 1.0

    @classmethod
    def checked(cls, make: Callable[..., "Hyper"], lr, **values) -> "Hyper":
        """``make(lr, **values)`` (one of the constructors below) for the functional API: each value
        first checked to be a number (so that its error names the argument), then the record."""
        for name, value in values.items():
            finite(name, value)
        hyper = make(lr, **values)
        hyper.check()
        return hyper

    @classmethod
    def linbreg(cls, lr, momentum: float = 0.0, delta: float = 1.0) -> "Hyper":
        return cls(Kind.LINBREG, lr, beta1=float(momentum), delta=float(delta))

    @classmethod
    def adabreg(cls, lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, delta: float = 1.0) -> "Hyper":
        return cls(Kind.ADABREG, lr, beta1=float(beta1), beta2=float(beta2), eps=float(eps), delta=float(delta))

    @classmethod
    def proxsgd(cls, lr) -> "Hyper":
        return cls(Kind.PROXSGD, lr)

    def check(self) -> None:
        """Refuse values no step can use, naming the functional API's argument (the optimizer
        classes check their groups' keys themselves). A tensor lr is checked for its form only:
        reading it would sync a device."""
        if isinstance(self.lr, torch.Tensor):
            check_lr_tensor(self.lr)
        else:
            check_lr_value(self.lr)
        if self.kind == Kind.LINBREG:
            in_unit_interval("momentum", self.beta1)
        if self.kind == Kind.ADABREG:
            in_unit_interval("beta1", self.beta1)
            in_unit_interval("beta2", self.beta2)
            at_least_zero("eps", self.eps)
        if self.uses_dual:
            positive("delta", self.delta)

    # -- which states a step reads and writes ------------------------------------------------------
    @property
    def uses_dual(self) -> bool:
        return self.kind != Kind.PROXSGD

    @property
    def uses_exp_avg(self) -> bool:
        """AdaBreg's first moment, or LinBreg's momentum buffer when β > 0."""
        return self.kind == Kind.ADABREG or (self.kind == Kind.LINBREG and self.beta1 > 0)

    @property
    def uses_exp_avg_sq(self) -> bool:
        return self.kind == Kind.ADABREG

    @property
    def momentum(self) -> bool:
        """LinBreg with β > 0 (m ← β·m + (1−β)·τ·g; v ← v − m)."""
        return self.kind == Kind.LINBREG and self.beta1 > 0

    # -- derived constants (bregman::StepParams, the Triton hyper columns) ------------------------
    @property
    def one_minus_beta1(self) -> float:
        return 1.0 - self.beta1

    @property
    def one_minus_beta2(self) -> float:
        return 1.0 - self.beta2

    @property
    def mom_scale(self) -> float:
        """(1 − β)·τ, LinBreg's momentum increment per unit grad."""
        return (1.0 - self.beta1) * float(self.lr)

    def step_size(self, t: float) -> float:
        """AdaBreg: τ / (1 − β1^t) at step count t (0 for the other kinds)."""
        return float(self.lr) / (1.0 - self.beta1**t) if self.kind == Kind.ADABREG else 0.0

    def bc2_sqrt(self, t: float) -> float:
        """AdaBreg: √(1 − β2^t) at step count t (1 for the other kinds)."""
        return math.sqrt(1.0 - self.beta2**t) if self.kind == Kind.ADABREG else 1.0

    @property
    def prox_delta(self) -> float:
        """The δ of θ = δ·shrink(x): δ for the Bregman methods, 1 for ProxSGD."""
        return 1.0 if self.kind == Kind.PROXSGD else self.delta

    @property
    def threshold_scale(self) -> float:
        """Thresholds are λ for the Bregman methods and τ·λ for ProxSGD (prox of τJ)."""
        return float(self.lr) if self.kind == Kind.PROXSGD else 1.0

    def thr_l1(self, lamda_l1: float) -> float:
        """The element-wise threshold."""
        return self.threshold_scale * lamda_l1

    def thr_row(self, lamda_group: float, n: int) -> float:
        """The row threshold λ₂·√n (·τ for ProxSGD), as bregman::row_threshold."""
        return self.threshold_scale * (lamda_group * math.sqrt(n))


class StepTensors(NamedTuple):
    """The lists one backend call updates in place, one entry per param (``exp_avgs`` holds
    LinBreg's momentum buffers; lists a kind does not use are empty).

    The moments of one call share a format (moments.py): float32 (the state dtype), bfloat16, or
    8-bit codes (int8 m, uint8 s) with their block scales in ``exp_avg_scales`` /
    ``exp_avg_sq_scales`` (empty for the other formats)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    duals: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    exp_avg_scales: list[torch.Tensor] = []
    exp_avg_sq_scales: list[torch.Tensor] = []

    @property
    def moments(self) -> str:
        """The format of this call's moments ("fp32" when it has none)."""
        return moments_format_of(self.exp_avgs[0]) if self.exp_avgs else "fp32"


def check_amp(grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """AMP scalars: one-element floating-point tensors (GradScaler's float32 ones)."""
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point()):
            got = f"{t.dtype} with {t.numel()} elements" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a one-element floating-point tensor, got {got}")


def check_tensors(tensors: StepTensors, hyper: Hyper, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """The checks every backend's step needs before it writes anything: one tensor per param in
    every list the kind reads; grads of their param's shape; states in the state dtype and the
    param's shape; all on params[0]'s device; one-element step counts. ``dtypes``: the param (and
    grad) dtypes the backend supports. One pass, attribute reads and comparisons only (it runs on
    every tensor at every step where a backend has no compiled checks)."""
    params, grads, duals, exp_avgs, exp_avg_sqs, steps = tensors[:6]
    n = len(params)
    states = [(name, lst) for name, lst, used in (("duals", duals, hyper.uses_dual),
                                                   ("exp_avgs", exp_avgs, hyper.uses_exp_avg),
                                                   ("exp_avg_sqs", exp_avg_sqs, hyper.uses_exp_avg_sq)) if used]
    for name, lst in [("grads", grads), ("steps", steps)] + states:
        if len(lst) != n:
            raise ValueError(f"{name}: expected {n} tensors (one per param), got {len(lst)}")
    if n == 0:
        return
    fmt = tensors.moments if hyper.uses_exp_avg else "fp32"
    if fmt != "fp32":
        _check_compact_moments(tensors, hyper, fmt)
        states = states[:1]  # the dual; the moments were checked
    if fmt != "8bit":  # as the compiled ops: scales given where none are read would be ignored
        for name, scales in (("exp_avg_scales", tensors.exp_avg_scales),
                             ("exp_avg_sq_scales", tensors.exp_avg_sq_scales)):
            if scales:
                raise ValueError(f"{name}: only 8-bit moments have block scales; this call's moments are {fmt} "
                                 "(pass an empty list, or moments='8bit' with 8-bit codes)")
    device, first_dtype = params[0].device, params[0].dtype
    for i, (p, g) in enumerate(zip(params, grads)):
        dtype, shape = p.dtype, p.shape
        if dtypes is not None and dtype not in dtypes:
            raise TypeError(f"params[{i}]: supported dtypes are {[str(d) for d in dtypes]}, got {dtype}")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}]: expected a floating-point tensor, got {dtype}")
        if dtype != first_dtype:  # as the compiled ops: one dtype per call, whatever the backend
            raise TypeError(f"params[{i}] is {dtype}, params[0] {first_dtype}: all params of one call share one "
                            "dtype; split the lists by dtype (the optimizer classes bucket them so), or for a model "
                            "converted after its first step: opt.load_state_dict(opt.state_dict())")
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device}, params[0] on {device}: one device per call")
        if g.shape != shape or not g.is_floating_point() or g.device != device or (dtypes and g.dtype not in dtypes):
            raise ValueError(f"grads[{i}]: expected a floating tensor of shape {list(shape)} on {device}, "
                             f"got {g.dtype} {list(g.shape)} on {g.device}")
        s_dtype = state_dtype(dtype)
        for name, lst in states:
            st = lst[i]
            if st.shape != shape or st.dtype != s_dtype or st.device != device:
                raise ValueError(f"{name}[{i}]: expected {s_dtype} of shape {list(shape)} on {device} (the state "
                                 f"dtype of a {dtype} param), got {st.dtype} {list(st.shape)} on {st.device}; a "
                                 "model converted after its first step? opt.load_state_dict(opt.state_dict()) "
                                 "re-places its states")
        if steps[i].numel() != 1 or steps[i].dtype != torch.float32:
            raise ValueError(f"steps[{i}]: expected a one-element float32 step count, got {steps[i].dtype} with "
                             f"{steps[i].numel()} elements")


def _check_compact_moments(tensors: StepTensors, hyper: Hyper, fmt: str) -> None:
    """The moments of a compact call (moments.py): one format for all, param-shaped, bf16 or the
    8-bit codes (contiguous) with block scales of ``moments.scale_shape``; params not float64."""
    lists = [("exp_avgs", tensors.exp_avgs, "exp_avg_scales", tensors.exp_avg_scales, torch.int8)]
    if hyper.uses_exp_avg_sq:
        lists.append(("exp_avg_sqs", tensors.exp_avg_sqs, "exp_avg_sq_scales", tensors.exp_avg_sq_scales, torch.uint8))
    n = len(tensors.params)
    for name, lst, scale_name, scales, code_dtype in lists:
        want = torch.bfloat16 if fmt == "bf16" else code_dtype
        if fmt == "8bit" and len(scales) != n:
            raise ValueError(f"{scale_name}: expected {n} tensors (one block-scale tensor per 8-bit moment), "
                             f"got {len(scales)}")
        for i, (p, st) in enumerate(zip(tensors.params, lst)):
            if p.dtype == torch.float64:
                raise TypeError(f"params[{i}]: {fmt} moments are for float32/bf16/fp16 params; a float64 param "
                                "keeps float64 moments (moments='fp32')")
            if st.dtype != want or st.shape != p.shape or st.device != p.device:
                raise ValueError(f"{name}[{i}]: expected {want} of shape {list(p.shape)} on {p.device} ({fmt} moments "
                                 f"of this call), got {st.dtype} {list(st.shape)} on {st.device}")
            if fmt == "8bit":
                sc, shape = scales[i], moments_scale_shape(p.shape)
                if not (p.is_contiguous() and st.is_contiguous()):
                    raise ValueError(f"{name}[{i}]: 8-bit moments need a contiguous param and codes (their blocks "
                                     "follow dim-0 rows in memory); call .contiguous() on the param")
                if sc.dtype != torch.float32 or tuple(sc.shape) != shape or sc.device != p.device or not sc.is_contiguous():
                    raise ValueError(f"{scale_name}[{i}]: expected contiguous float32 of shape {list(shape)} on "
                                     f"{p.device}, got {sc.dtype} {list(sc.shape)} on {sc.device}")


def begin_step(steps: list[torch.Tensor], found_inf: torch.Tensor | None, capturable: bool,
               op_counts_cpu_steps: bool) -> list[torch.Tensor] | None:
    """The step-count and skipped-step (AMP ``found_inf``) policy, applied once before a backend runs.
    Returns the counters it advanced (for ``undo_step``), or None when the step is skipped.

    Not capturable: ``found_inf`` (an inf/NaN in the grads) is read on the host ONCE; a skipped
    step changes nothing at all (no param, state or count): None is returned, the backend is not
    called and the step returns None. Otherwise every count is advanced by one (a float32 add) and
    the backend reads the new counts (AdaBreg's bias corrections).

    Capturable [note: capturable]: nothing is read on the host. The counts (on the params' device)
    advance by ``found_inf == 0``; the backend receives ``found_inf``, leaves params and states
    unchanged itself when it is set, and returns the non-zero counts either way, since knowing
    whether the step ran would need a host read.

    [note: who adds] Counters on a device are advanced here, with one foreach launch per device.
    Counters on the CPU are 0-dim tensors, one per param, and an add from Python costs µs each
    (6-8 ms for the 2000-tensor workload): a compiled op (``op_counts_cpu_steps``) adds them itself
    in C++ after its checks, by the same rule (not when found_inf is set); the Python backends'
    are advanced here."""
    if not capturable and found_inf is not None and bool(found_inf.item()):
        return None
    # the ops keep all counters of a call where steps[0] is: one look decides (not one per tensor)
    advanced = [] if op_counts_cpu_steps and steps and steps[0].device.type == "cpu" else steps
    _add_to_counts(advanced, found_inf if capturable else None, 1.0)
    return advanced


def undo_step(advanced: list[torch.Tensor], found_inf: torch.Tensor | None, capturable: bool) -> None:
    """Take back ``begin_step``'s advance when the backend refused the call before writing."""
    _add_to_counts(advanced, found_inf if capturable else None, -1.0)


def _add_to_counts(steps: list[torch.Tensor], found_inf: torch.Tensor | None, sign: float) -> None:
    if not steps:
        return
    # with found_inf (capturable): one per count where the step ran; device ops only, no host read
    ran = sign if found_inf is None else (found_inf.reshape(()) == 0).to(torch.float32) * sign
    if torch.compiler.is_compiling() and len(set(map(id, steps))) < len(steps):
        # a counter shared by several params (the functional API allows it): compiled, a foreach
        # add of a list that repeats a tensor adds once; eager adds once per entry. (At trace time
        # only: the check costs nothing per compiled step.)
        for s in steps:
            s.add_(ran if found_inf is None else ran.to(s.device))
        return
    if found_inf is None:
        torch._foreach_add_(steps, sign)
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for s in steps:
        by_device.setdefault(s.device, []).append(s)
    for device, counts in by_device.items():
        torch._foreach_add_(counts, ran.to(device, non_blocking=True))


# backend step: step(tensors, hyper, reg, *, grad_scale=None, found_inf=None, capturable=False)
StepFn = Callable[..., "torch.Tensor | None"]
