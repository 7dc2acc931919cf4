"""Regularizers J(θ): value, proximal map and a subgradient.

Every regularizer here is positively 1-homogeneous (a norm, or a norm plus the indicator of a
cone), so the elastic-net proximal map the Bregman optimizers need reduces to the plain one:

    prox_{δJ}(δ·v) = δ · prox_J(v)                                   [note: homogeneity]

which is why a regularizer only has to provide ``shrink(x, t) = prox_{tJ}(x)``. The Bregman step
calls ``shrink(v, 1)`` and multiplies by δ; ProxSGD calls ``shrink(θ − τg, τ)``.

Group regularizers act on rows of a ``(rows, n)`` view of the tensor. ``group_size(shape)``
returns n (1 for the element-wise ones) and is what the fused kernels receive: they only know
"element-wise L1-type map" or "row map with threshold λ·√n".
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from .arguments import finite
from .prox_maps import row_norms, row_scale, soft_threshold

__all__ = [
    "Regularizer",
    "NoReg",
    "L1",
    "L1Pos",
    "GroupL1L2",
    "KernelL1L2",
    "SparseGroupL1L2",
    "Nuclear",
    "regularizer_from_dict",
]


def _check_lamda(name: str, value: float) -> float:
    value = finite(name, value)  # a number, not a string (arguments.finite)
    if value < 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be a finite number >= 0)")
    return value


def _refuse_unknown_keywords(cls_name: str, unknown: dict[str, Any], known: tuple[str, ...]) -> None:
    """``L1(lambda_=...)`` names the public class and its keywords (λ is spelt ``lamda``: ``lambda``
    is a Python keyword)."""
    if unknown:
        raise TypeError(f"{cls_name}() got unexpected keyword argument(s) {sorted(unknown)}; its keywords are "
                        f"{', '.join(known)} (spelt 'lamda': 'lambda' is a Python keyword)")


class Regularizer:
    """Base class. ``kind`` tells the fused backends which map to run:

    ``"none"``, ``"l1"``, ``"l1pos"`` (element-wise), ``"group"``, ``"sparse_group"`` (row maps),
    ``"nuclear"`` (reference backend only).

    The fused kernels run the built-in map of ``kind``, never a Python ``shrink``: they take only
    the exact built-in classes. A subclass runs on the reference backend (``"auto"`` picks it with
    a one-time warning; a named fused backend refuses), unless it declares in its own class body
    ``keeps_builtin_map = True`` (it changes no math, e.g. adds logging).
    """

    kind = "none"
    keeps_builtin_map = False  # read from the class's own body only: subclasses do not inherit it

    # -- the three things every regularizer provides -------------------------------------------
    def value(self, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shrink(self, x: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        """prox_{tJ}(x), out of place, in x's dtype."""
        raise NotImplementedError

    def subgradient(self, theta: torch.Tensor) -> torch.Tensor:
        """An element p of ∂J(θ) with prox_J(θ/δ + p)·δ = θ for every δ > 0."""
        raise NotImplementedError

    # -- shared helpers -------------------------------------------------------------------------
    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        return self.value(theta)

    def group_size(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Length n of the rows this regularizer couples (1 for element-wise maps)."""
        return 1

    def lamdas(self) -> tuple[float, float]:
        """(λ of the element-wise soft-threshold, λ of the row shrink before its √n factor).

        This pair, ``kind`` and ``group_size`` are all a fused kernel needs to know.
        """
        return 0.0, 0.0

    def thresholds(self, shape) -> tuple[float, float]:
        """(element-wise threshold, row threshold λ_group·√n) for t = 1."""
        l1, group = self.lamdas()
        return l1, group * math.sqrt(self.group_size(shape))

    def check_param(self, p: torch.Tensor) -> None:
        """Raise ValueError if this regularizer cannot act on a tensor of p's shape."""
        self.group_size(p.shape)

    def prox(self, v: torch.Tensor, delta: float) -> torch.Tensor:
        """The elastic-net map θ = prox_{δJ}(δ·v) used by the Bregman optimizers."""
        return self.shrink(v, 1.0) * delta

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form stored in optimizer checkpoints (loadable with weights_only=True)."""
        return {"name": type(self).__name__, **self._params()}

    def _params(self) -> dict[str, float]:
        return {}

    def scale_strength(self, factor: float) -> None:
        """Multiply every λ by ``factor`` (used by the λ scheduler)."""
        for key, val in self._params().items():
            setattr(self, key, _check_lamda(key, val * factor))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._params() == other._params()  # type: ignore[union-attr]

    __hash__ = None  # mutable (the λ scheduler changes λ)


class NoReg(Regularizer):
    """J = 0: LinBreg becomes SGD (δ = 1), AdaBreg becomes Adam."""

    kind = "none"

    def value(self, theta):
        return theta.new_zeros((), dtype=_opmath(theta.dtype))

    def shrink(self, x, t=1.0):
        return x.clone()

    def subgradient(self, theta):
        return torch.zeros_like(theta)


class _LamdaReg(Regularizer):
    def __init__(self, lamda: float | None = None, **unknown: Any):
        _refuse_unknown_keywords(type(self).__name__, unknown, ("lamda",))
        if lamda is None:
            raise TypeError(f"{type(self).__name__}() needs the strength lamda, e.g. {type(self).__name__}(lamda=1e-3)")
        self.lamda = _check_lamda("lamda", lamda)

    def _params(self):
        return {"lamda": self.lamda}


class L1(_LamdaReg):
    """J(θ) = λ‖θ‖₁ (element-wise sparsity)."""

    kind = "l1"

    def value(self, theta):
        return self.lamda * theta.to(_opmath(theta.dtype)).abs().sum()

    def shrink(self, x, t=1.0):
        return soft_threshold(x, t * self.lamda)

    def subgradient(self, theta):
        return self.lamda * torch.sign(theta)

    def lamdas(self):
        return self.lamda, 0.0


class L1Pos(L1):
    """J(θ) = λ‖θ‖₁ + ι(θ ≥ 0). Negative initial weights are projected to 0 by the first step."""

    kind = "l1pos"

    def shrink(self, x, t=1.0):
        return torch.clamp(x - t * self.lamda, min=0.0)


class GroupL1L2(_LamdaReg):
    """J(θ) = λ·√n·Σ_r ‖θ_r‖₂ over the rows of θ.flatten(1) (n = row length): neuron sparsity.

    A 1-D tensor is one row per element (n = 1), i.e. plain L1.
    """

    kind = "group"

    def group_size(self, shape):
        shape = tuple(shape)
        if len(shape) == 0:
            return 1
        return math.prod(shape[1:])

    def lamdas(self):
        return 0.0, self.lamda

    def _rows(self, x):
        n = self.group_size(x.shape)
        return x.reshape(-1, n) if n > 0 else x.reshape(0, 0)

    def value(self, theta):
        n = self.group_size(theta.shape)
        if theta.numel() == 0:
            return theta.new_zeros((), dtype=_opmath(theta.dtype))
        rows = self._rows(theta.to(_opmath(theta.dtype)))
        return self.lamda * math.sqrt(n) * torch.linalg.vector_norm(rows, dim=1).sum()

    def shrink(self, x, t=1.0):
        if x.numel() == 0:
            return x.clone()
        _, thr = self.thresholds(x.shape)
        rows = self._rows(x)
        return (rows * row_scale(rows, t * thr)).reshape(x.shape)

    def subgradient(self, theta):
        if theta.numel() == 0:
            return torch.zeros_like(theta)
        _, thr = self.thresholds(theta.shape)
        rows = self._rows(theta)
        norm = row_norms(rows)
        p = torch.where(norm > 0, rows / torch.clamp(norm, min=torch.finfo(norm.dtype).tiny), 0.0)
        return (thr * p).reshape(theta.shape)


class KernelL1L2(GroupL1L2):
    """Group sparsity over the kh×kw kernels of a conv weight (out, in, kh, kw): n = kh·kw."""

    def group_size(self, shape):
        shape = tuple(shape)
        if len(shape) < 3:
            raise ValueError(
                f"KernelL1L2 needs conv weights with at least 3 dims (out, in, *kernel); got shape {list(shape)}. "
                "Use L1 or GroupL1L2 for linear layers and biases."
            )
        return math.prod(shape[2:])


class SparseGroupL1L2(GroupL1L2):
    """J(θ) = λ₁‖θ‖₁ + λ₂·√n·Σ_r ‖θ_r‖₂ (rows of θ.flatten(1)).

    Its prox is soft-thresholding followed by the group shrink; λ₁ and λ₂ enter exactly once each
    (the research code multiplied λ in twice here).
    """

    kind = "sparse_group"

    def __init__(self, lamda_l1: float | None = None, lamda_group: float | None = None, **unknown: Any):
        _refuse_unknown_keywords(type(self).__name__, unknown, ("lamda_l1", "lamda_group"))
        if lamda_l1 is None or lamda_group is None:
            raise TypeError("SparseGroupL1L2() needs both strengths, e.g. SparseGroupL1L2(lamda_l1=1e-3, lamda_group=1e-2)")
        self.lamda_l1 = _check_lamda("lamda_l1", lamda_l1)
        self.lamda_group = _check_lamda("lamda_group", lamda_group)

    def _params(self):
        return {"lamda_l1": self.lamda_l1, "lamda_group": self.lamda_group}

    def lamdas(self):
        return self.lamda_l1, self.lamda_group

    def value(self, theta):
        if theta.numel() == 0:
            return theta.new_zeros((), dtype=_opmath(theta.dtype))
        t = theta.to(_opmath(theta.dtype))
        n = self.group_size(theta.shape)
        group = torch.linalg.vector_norm(self._rows(t), dim=1).sum()
        return self.lamda_l1 * t.abs().sum() + self.lamda_group * math.sqrt(n) * group

    def shrink(self, x, t=1.0):
        if x.numel() == 0:
            return x.clone()
        l1, thr = self.thresholds(x.shape)
        rows = self._rows(soft_threshold(x, t * l1))
        return (rows * row_scale(rows, t * thr)).reshape(x.shape)

    def subgradient(self, theta):
        # the L1 part plus GroupL1L2's row part (its threshold is λ₂·√n here too)
        return self.lamda_l1 * torch.sign(theta) + super().subgradient(theta)


class Nuclear(_LamdaReg):
    """J(θ) = λ‖θ.flatten(1)‖_* (low rank). Needs an SVD per step: reference backend only."""

    kind = "nuclear"

    def group_size(self, shape):
        if len(tuple(shape)) < 2:
            raise ValueError(f"Nuclear needs a tensor with at least 2 dims; got shape {list(shape)}")
        return 1

    def _mat(self, x):
        return x.reshape(x.shape[0], -1)

    # [note: non-finite SVD input] torch's SVD raises on NaN/inf, which would stop a step half-way
    # (other params already written); element-wise maps give NaN there, so this one does too: the
    # SVD sees zeros, the result is NaN. No branch on the data (it would break a compiled graph).
    @staticmethod
    def _finite_or_zero(x):
        finite = torch.isfinite(x).all()
        return finite, torch.where(finite, x, 0.0)

    @staticmethod
    def _nan_unless(finite, y):
        return torch.where(finite, y, math.nan)

    def value(self, theta):
        if theta.numel() == 0:
            return theta.new_zeros((), dtype=_opmath(theta.dtype))
        finite, theta = self._finite_or_zero(theta.to(_opmath(theta.dtype)))
        return self._nan_unless(finite, self.lamda * torch.linalg.matrix_norm(self._mat(theta), ord="nuc"))

    def shrink(self, x, t=1.0):
        if x.numel() == 0:
            return x.clone()
        finite, x_ = self._finite_or_zero(x)  # [note: non-finite SVD input]
        u, s, vh = torch.linalg.svd(self._mat(x_), full_matrices=False)
        s = torch.clamp(s - t * self.lamda, min=0.0)
        return self._nan_unless(finite, ((u * s) @ vh).reshape(x.shape))

    def subgradient(self, theta):
        if theta.numel() == 0:
            return torch.zeros_like(theta)
        finite, theta_ = self._finite_or_zero(theta)  # [note: non-finite SVD input]
        u, s, vh = torch.linalg.svd(self._mat(theta_), full_matrices=False)
        # only the directions of the non-zero singular values: then prox(δ·v₀) = θ₀ exactly
        tol = s.max() * max(theta.shape[0], self._mat(theta).shape[1]) * torch.finfo(s.dtype).eps
        keep = (s > tol).to(s.dtype)
        return self._nan_unless(finite, (self.lamda * (u * keep) @ vh).reshape(theta.shape))


BUILTIN_TYPES = (NoReg, L1, L1Pos, GroupL1L2, KernelL1L2, SparseGroupL1L2, Nuclear)
_REGISTRY = {cls.__name__: cls for cls in BUILTIN_TYPES}


def runs_builtin_map(reg: Regularizer) -> bool:
    """True when ``reg`` computes exactly its kind's built-in map: a built-in class, or a subclass
    that says so in its own class body (``keeps_builtin_map = True``)."""
    cls = type(reg)
    return cls in BUILTIN_TYPES or bool(cls.__dict__.get("keeps_builtin_map", False))


def regularizer_from_dict(d: dict[str, Any], like: Regularizer | None = None) -> Regularizer:
    """Inverse of ``Regularizer.to_dict``. The name picks the class: ``like``'s own class when the
    names agree (a user's subclass, which a checkpoint names but cannot hold: a copy of ``like``
    with the saved λs), else the built-in class of that name."""
    d = dict(d)
    name = d.pop("name", None)
    if like is not None and type(like).__name__ == name:
        if set(d) != set(like._params()):
            raise ValueError(f"the checkpoint's {name} has parameters {sorted(d)}, this group's {like!r} "
                             f"{sorted(like._params())}")
        reg = copy.copy(like)
        for key, value in d.items():
            setattr(reg, key, _check_lamda(key, value))
        return reg
    if name not in _REGISTRY:
        own = f", or this group's own {type(like).__name__}" if like is not None else ""
        raise ValueError(f"Unknown regularizer {name!r} in checkpoint; known: {sorted(_REGISTRY)}{own}")
    return _REGISTRY[name](**d)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
