"""The per-element math of the Triton kernels: dual updates, proximal maps, row factor.

Mirrors csrc/bregman_math.h formula by formula and in the same op order, so that both match
backends/reference.py up to the same rounding. Also the codes and hyper-table columns the kernels
share with the host: the codes are backends/contract.py's enums, the columns are named by
``HYPER_COLUMNS`` (the names of ``contract.Hyper``'s derived constants), so nothing here is a
magic number. Divisions and square roots are the correctly rounded ones (``div_rn``, ``sqrt_rn``)
because the default float32 ``/`` on NVIDIA GPUs is an approximate division.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..contract import Kind, RegCode

# KIND_<NAME> and REG_<NAME>: the contract's codes as compile-time constants of the kernels
for _code in Kind:
    globals()[f"KIND_{_code.name}"] = tl.constexpr(int(_code))
for _code in RegCode:
    globals()[f"REG_{_code.name}"] = tl.constexpr(int(_code))

# [note: hyper table] One float64 row per tensor, cast to the compute type in the kernel. Each
# column is the ``contract.Hyper`` constant of that name, and the field of bregman::StepParams of
# that name (tests/test_contract.py); ``thr_row`` is λ₂·√n, formed on the host in double.
HYPER_COLUMNS = ("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "mom_scale", "step_size",
                 "bc2_sqrt", "prox_delta", "thr_l1", "thr_row")
# HP_<NAME> = its column, for every name (HP_LR, HP_BETA1, ..., HP_THR_ROW): written from the one
# list, so a column can be neither misnumbered nor missing
for _col, _name in enumerate(HYPER_COLUMNS):
    globals()[f"HP_{_name.upper()}"] = tl.constexpr(_col)
HP_COLS = tl.constexpr(len(HYPER_COLUMNS))


# ---- exact arithmetic building blocks --------------------------------------------------------
@triton.jit
def _div(a, b):
    """a / b, correctly rounded (float32 '/' is approximate on NVIDIA GPUs; float64 '/' is exact)."""
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def _sqrt(x):
    """√x, correctly rounded, as ::sqrtf / ::sqrt in bregman_math.h."""
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


# ---- dual / point updates (bregman_math.h: linbreg_update ... proxsgd_point) ------------------
@triton.jit
def linbreg_update(v, g, lr):
    """LinBreg, β = 0: v ← v − τ·g."""
    return v - lr * g


@triton.jit
def linbreg_momentum_update(v, m, g, beta1, mom_scale):
    """LinBreg, β > 0: m ← β·m + (1−β)·τ·g ; v ← v − m."""
    m = m * beta1 + mom_scale * g
    v = v - m
    return v, m


@triton.jit
def _lerp(a, b, w):
    """torch.lerp(a, b, w) in torch's two-branch form (exact at w = 0 and w = 1)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def adabreg_update(v, m, s, g, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt):
    """AdaBreg: m ← β1·m + (1−β1)·g ; s ← β2·s + (1−β2)·g² ;
    v ← v − (τ/(1−β1^t)) · m / (√s/√(1−β2^t) + ε)."""
    m = _lerp(m, g, one_minus_beta1)
    s = s * beta2 + one_minus_beta2 * g * g
    denom = _div(_sqrt(s), bc2_sqrt) + eps
    v = v - step_size * _div(m, denom)
    return v, m, s


@triton.jit
def adabreg_step(v, m, s, g, hyp):
    """``adabreg_update`` with the hyper-parameters of a tensor's table row ``hyp``."""
    return adabreg_update(v, m, s, g, hyp[HP_ONE_MINUS_BETA1], hyp[HP_BETA2], hyp[HP_ONE_MINUS_BETA2], hyp[HP_EPS],
                          hyp[HP_STEP_SIZE], hyp[HP_BC2_SQRT])


@triton.jit
def linbreg_momentum_step(v, m, g, hyp):
    """``linbreg_momentum_update`` with the hyper-parameters of a tensor's table row ``hyp``."""
    return linbreg_momentum_update(v, m, g, hyp[HP_BETA1], hyp[HP_MOM_SCALE])


@triton.jit
def proxsgd_point(theta, g, lr):
    """ProxSGD: the point θ − τ·g that prox_{τJ} is applied to."""
    return theta - lr * g


# ---- proximal maps (bregman_math.h: soft_threshold, elementwise_shrink, row_factor) -----------
@triton.jit
def soft_threshold(x, thr):
    """sign(x)·max(|x| − thr, 0) written as x − clamp(x, −thr, thr) (same rounding, branch-free)."""
    return x - tl.minimum(tl.maximum(x, -thr), thr)


@triton.jit
def elementwise_shrink(x, thr_l1, REG: tl.constexpr):
    """The element-wise part of the map: the whole map for none/L1/L1Pos, the L1 part of
    sparse_group, identity for group. Still to be scaled by δ (and the row factor)."""
    if REG == REG_L1 or REG == REG_SPARSE_GROUP:
        u = soft_threshold(x, thr_l1)
    elif REG == REG_L1POS:
        u = tl.maximum(x - thr_l1, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        u = x
    return u


@triton.jit
def row_factor(sum_sq, thr_row):
    """max(1 − thr/‖u_r‖, 0) from Σu², 0 for a zero row; thr_row = λ₂·√n (·τ for ProxSGD)."""
    return row_factor_norm(_sqrt(sum_sq), thr_row)


@triton.jit
def row_factor_norm(norm, thr_row):
    """max(1 − thr/‖u_r‖, 0) from the norm; a row of one element passes |u| (bregman_math.h
    [note: one-element rows])."""
    safe = tl.where(norm > 0, norm, 1.0)
    return tl.where(norm > thr_row, 1.0 - _div(thr_row, safe), 0.0)
