"""Every fused backend against the reference on the whole config table (params AND states)."""
from __future__ import annotations

import os

import pytest
import torch

from bregman_fused.backends import unavailable_reason as _unavailable_reason
from bregman_fused.regularizers import NoReg

from configs import CONFIGS, Config, assert_matches_reference, make_configs

# configs a fused backend does not take (reference-only regularizer)
FUSED_CONFIGS = [c for c in CONFIGS if c.reg != "nuclear"]


def _skip_unless(backend: str, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    reason = _unavailable_reason(backend, torch.device(device), NoReg())
    if reason is not None:
        if os.environ.get("CI") and backend == "cpu":
            pytest.fail(f"CI must build the CPU extension: {reason}")
        pytest.skip(reason)


@pytest.mark.parametrize("cfg", FUSED_CONFIGS, ids=lambda c: c.id)
def test_cpu_matches_reference(cfg: Config):
    _skip_unless("cpu", "cpu")
    assert_matches_reference(cfg, "cpu")


@pytest.mark.parametrize("cfg", FUSED_CONFIGS, ids=lambda c: c.id)
def test_cuda_matches_reference(cfg: Config):
    _skip_unless("cuda", "cuda")
    assert_matches_reference(cfg, "cuda", device="cuda")


@pytest.mark.parametrize("cfg", FUSED_CONFIGS, ids=lambda c: c.id)
def test_triton_gpu_matches_reference(cfg: Config):
    _skip_unless("triton", "cuda")
    assert_matches_reference(cfg, "triton", device="cuda")


# The Triton interpreter is slow on the CPU: a smaller table that still covers every optimizer ×
# regularizer × dtype and the odd shapes.
TRITON_INTERPRETER_CONFIGS = make_configs(
    regs=["none", "l1", "l1pos", "group", "kernel", "sparse_group"],
    shapes=[(0,), (1,), (37,), (13, 7), (2, 3, 5, 5)],
)


@pytest.mark.parametrize("cfg", TRITON_INTERPRETER_CONFIGS, ids=lambda c: c.id)
def test_triton_interpreter_matches_reference(cfg: Config):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")
    _skip_unless("triton", "cpu")
    assert_matches_reference(cfg, "triton")


# [note: moment precision] The table's tolerance is absolute at the scale max(1, max|ref|); the
# Adam moments are much smaller than 1 (s ≈ (1−β2)·g² early on), so a kernel that rounds a
# coefficient differently from the reference (e.g. 1−β2 formed in float from a rounded β2: off
# by 1.3e-5 relative for β2 = 0.999) hides under it. Here the moments are compared element-wise,
# relative to their own size, with the fp32 reference computing the same ops in the same order.
MOMENT_BACKENDS = [("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.9999)], ids=["default-betas", "beta1-below-half"])
@pytest.mark.parametrize("backend,device", MOMENT_BACKENDS, ids=lambda x: x if isinstance(x, str) else None)
def test_adam_moments_match_the_reference_to_a_few_ulp(backend, device, betas):
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")
    _skip_unless(backend, device)
    import bregman_fused as bf

    gen = torch.Generator().manual_seed(3)
    shape = (257,)
    theta0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) * 10.0 ** float(k - 2) for k in range(5)]

    def run(name, dev):
        p = torch.nn.Parameter(theta0.to(dev))
        opt = bf.AdaBreg([p], lr=1e-3, betas=betas, reg=bf.L1(1e-2), backend=name)
        for g in grads:
            p.grad = g.to(dev)
            opt.step()
        return {k: opt.state[p][k].cpu().double() for k in ("exp_avg", "exp_avg_sq")}

    got, ref = run(backend, device), run("reference", "cpu")
    eps = torch.finfo(torch.float32).eps
    g_scale = max(g.abs().max().item() for g in grads)
    m_err = (got["exp_avg"] - ref["exp_avg"]).abs()
    assert (m_err <= 8 * eps * (ref["exp_avg"].abs() + g_scale * (1 - betas[0]))).all(), m_err.max()
    s_err = (got["exp_avg_sq"] - ref["exp_avg_sq"]).abs()
    assert (s_err <= 8 * eps * ref["exp_avg_sq"]).all(), (s_err / ref["exp_avg_sq"]).max()
