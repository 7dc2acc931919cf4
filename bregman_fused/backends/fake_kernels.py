"""Fake (meta) kernels of the compiled ops, for torch.compile and torch.library.opcheck: they
describe the output (one int64 non-zero count per param, on the params' device) without running
anything, so a compiled step traces through the op instead of breaking the graph there. The ops
update their tensor arguments in place; the schemas say which (csrc/ops.cpp, csrc/cuda/ops_cuda.cpp)."""
from __future__ import annotations

import torch

_registered: set[str] = set()


def _counts_like(params, grad_scale, found_inf) -> torch.Tensor:
    # an empty call answers on the device of the AMP scalars, as the ops do. Without params and AMP
    # scalars there is no tensor to dispatch on: torch cannot call the op at all (functional.fused_step
    # returns before it), and the CPU answer here only serves a fake call made by hand.
    where = params[0] if params else (found_inf if found_inf is not None else grad_scale)
    device = where.device if where is not None else torch.device("cpu")
    return torch.empty(len(params), dtype=torch.int64, device=device)


def register(op_name: str) -> None:
    """Register the fake kernel of ``bregman_fused::op_name`` once (after its module registered the op)."""
    if op_name in _registered:
        return
    qualname = f"bregman_fused::{op_name}"
    if op_name == "fused_step":
        for overload in ("", ".tensor_lr"):  # lr a float or a one-element tensor: the same output
            @torch.library.register_fake(qualname + overload)
            def _fused_step(kind, params, grads, duals, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps,
                            group_sizes, lr, beta1, beta2, eps, delta, reg, lamda_l1, lamda_group, grad_scale,
                            found_inf):
                return _counts_like(params, grad_scale, found_inf)
    elif op_name == "fused_step_capturable":
        @torch.library.register_fake(qualname)
        def _fused_step_capturable(kind, params, grads, duals, exp_avgs, exp_avg_sqs, exp_avg_scales,
                                   exp_avg_sq_scales, steps, group_sizes, lr, beta1, beta2, eps, delta, reg, lamda_l1,
                                   lamda_group, grad_scale, found_inf, counts):
            return None
    else:
        raise ValueError(f"no fake kernel for {qualname}")
    _registered.add(op_name)
