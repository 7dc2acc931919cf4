"""The per-element and per-row maps the regularizers' proximal maps are built from, in the spec's
forms (csrc/bregman_math.h computes the same per-element bits; its row sums add in their own order)."""
from __future__ import annotations

import torch

from .scalar_tensors import scalar_like

__all__ = ["soft_threshold", "row_norms", "row_scale"]


def soft_threshold(x: torch.Tensor, thr: float) -> torch.Tensor:
    """sign(x)·max(|x| − thr, 0), written x − clamp(x, −thr, thr) as the kernels write it: the same
    values (x ∓ thr rounded once), and the same bits where the forms differ: +0.0 where x is zeroed
    (sign(x)·0 gave −0.0 for negative x) and x's own NaN (torch.sign gave the positive one). thr
    as a tensor: scalar_tensors [note: numbers as tensors]."""
    bound = scalar_like(x, thr)
    return x - torch.clamp(x, -bound, bound)


@torch.library.custom_op("bregman_fused::row_norms", mutates_args=())
def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """‖row‖₂ of each row of a 2-D tensor, shape (rows, 1).

    [note: opaque row norms] An op of its own so that torch.compile calls it as it is: inductor
    would generate its own reduction, which sums in another order than eager's kernel and so rounds
    differently; opaque, a compiled reference step computes the same bits as an eager one."""
    _check_2d(rows)
    return torch.linalg.vector_norm(rows, dim=1, keepdim=True)


@row_norms.register_fake
def _(rows):
    _check_2d(rows)
    return rows.new_empty((rows.shape[0], 1))


def _check_2d(rows: torch.Tensor) -> None:
    """The op and its fake kernel accept the same inputs: one row per entry of dim 0."""
    torch._check(rows.dim() == 2, lambda: f"row_norms: expected a 2-D tensor of rows, got {rows.dim()} dims")


def _row_norms_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _row_norms_backward(ctx, grad):
    """∂‖r‖/∂r = r/‖r‖ (0 for a zero row, as torch.linalg.vector_norm's subgradient)."""
    rows, norm = ctx.saved_tensors
    return grad * torch.where(norm > 0, rows / torch.clamp(norm, min=torch.finfo(norm.dtype).tiny), 0.0)


row_norms.register_autograd(_row_norms_backward, setup_context=_row_norms_setup)


def row_scale(rows: torch.Tensor, thr: float) -> torch.Tensor:
    """max(1 − thr/‖row‖, 0) per row; 0 for a zero row (thr ≥ 0)."""
    norm = row_norms(rows)
    # where norm <= thr the row vanishes; the clamp also avoids 0/0 for zero rows. thr as a tensor:
    # scalar_tensors [note: numbers as tensors]
    ratio = scalar_like(norm, thr) / torch.clamp(norm, min=torch.finfo(norm.dtype).tiny)
    return torch.where(norm > thr, 1.0 - ratio, 0.0)
