"""Backends "cpu" and "cuda": the compiled ops (torch.ops.bregman_fused.*) behind the step contract.

The op walks every tensor as flat memory: contiguous ones, and dense ones (e.g. channels_last)
whose partners share their strides, go in as they are; other layouts go in as permuted views or
copies, copied back here (layout.py [note: dense views]). Loading and building: loader.py.
"""
from __future__ import annotations

import torch

from ..regularizers import Regularizer
from . import loader
from .contract import Hyper, StepTensors, fused_code
from .layout import kernel_views

__all__ = ["cpu_step", "cuda_step", "CPU_MOMENTS", "CUDA_MOMENTS"]

# the moment formats each op's kernels store (moments.py)
CPU_MOMENTS = ("fp32", "bf16", "8bit")
CUDA_MOMENTS = ("fp32", "bf16", "8bit")


def _run_op(tensors: StepTensors, hyper: Hyper, reg: Regularizer, *, grad_scale=None, found_inf=None,
            capturable=False) -> torch.Tensor:
    """One call of the op for the bucket; returns the non-zeros of each new θ. ``capturable`` on
    CUDA tensors: ``fused_step_capturable``, with the counts and lr on the device and no host read
    (reference.py [note: capturable])."""
    params, grads, duals, exp_avgs, exp_avg_sqs, steps = tensors[:6]
    scales = (list(tensors.exp_avg_scales), list(tensors.exp_avg_sq_scales))  # 8-bit moments: contiguous, as they are
    if scales[0]:
        # kernel_views would hand a non-contiguous param over permuted, its codes with it, and the
        # blocks would follow that order instead of dim-0 rows (the checks of contract.py, before it)
        for i, (p, m) in enumerate(zip(params, exp_avgs)):
            if not (p.is_contiguous() and m.is_contiguous()):
                raise ValueError(f"exp_avgs[{i}]: 8-bit moments need a contiguous param and codes (their blocks "
                                 "follow dim-0 rows in memory); call .contiguous() on the param")
    code = fused_code(reg)
    if code is None:
        raise ValueError(f"the fused backends do not implement the {type(reg).__name__} regularizer "
                         "(use backend='reference')")
    lamda_l1, lamda_group = reg.lamdas()
    group_sizes = [int(reg.group_size(p.shape)) for p in params] if code.is_row_map else [1] * len(params)
    params_c, grads_c, states_c, writeback = kernel_views(params, grads, [duals, exp_avgs, exp_avg_sqs], group_sizes)
    # the AMP scalars may live elsewhere (GradScaler("cuda") with some CPU params): the op wants them
    # beside the params, as the reference's .to(g.device) does
    device = params[0].device if params else None
    if grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device)
    scalars = (float(hyper.beta1), float(hyper.beta2), float(hyper.eps), float(hyper.delta), int(code),
               float(lamda_l1), float(lamda_group), grad_scale, found_inf)
    with torch.no_grad():
        if capturable and device is not None and device.type == "cuda":
            counts = torch.empty(len(params), dtype=torch.int64, device=device)
            torch.ops.bregman_fused.fused_step_capturable(
                int(hyper.kind), params_c, grads_c, *states_c, *scales, list(steps), group_sizes,
                _device_lr(hyper.lr, device),
                *scalars, counts)
        elif isinstance(hyper.lr, torch.Tensor):  # read by the op, not here: no recompile per value
            counts = torch.ops.bregman_fused.fused_step.tensor_lr(
                int(hyper.kind), params_c, grads_c, *states_c, *scales, list(steps), group_sizes, hyper.lr, *scalars)
        else:
            counts = torch.ops.bregman_fused.fused_step(
                int(hyper.kind), params_c, grads_c, *states_c, *scales, list(steps), group_sizes, float(hyper.lr),
                *scalars)
        # a skipped (capturable) step copies back unchanged values: harmless, and no host read
        for orig, c in writeback:
            orig.copy_(c)
    return counts


def _device_lr(lr, device: torch.device) -> torch.Tensor:
    """lr as the 0-dim device tensor a capturable op reads. A float becomes a fill kernel (its value
    is fixed in a captured graph, as in torch's optimizers); a tensor must already be there, since
    copying it from the host cannot be captured."""
    if not isinstance(lr, torch.Tensor):
        return torch.full((), float(lr), dtype=torch.float64, device=device)
    if lr.device != device:
        raise ValueError(f"lr must be on the params' device ({device}) with capturable=True, got {lr.device}")
    if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lr must be a one-element float32/float64 tensor, got {lr.dtype} with {lr.numel()} elements")
    return lr.reshape(())


def cpu_step(tensors: StepTensors, hyper: Hyper, reg: Regularizer, **amp) -> torch.Tensor:
    """Backend "cpu": the fused C++ kernel (contract.py)."""
    loader.require_cpu()
    return _run_op(tensors, hyper, reg, **amp)


def cuda_step(tensors: StepTensors, hyper: Hyper, reg: Regularizer, **amp) -> torch.Tensor:
    """Backend "cuda": the same op; the dispatcher picks the CUDA kernel for CUDA tensors."""
    loader.require_cuda()
    return _run_op(tensors, hyper, reg, **amp)
