"""Every fused backend against the reference on the whole config table (params AND states)."""
from __future__ import annotations

import os

import pytest
import torch

from bregman_fused.functional import _unavailable_reason
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
