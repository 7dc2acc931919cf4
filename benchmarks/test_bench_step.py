"""pytest-benchmark suite: one optimizer step per provider on the ``small`` workload (≈0.42 M elements, 12 tensors).

Not part of the main test run (that one collects ``tests/`` only). Run with

    python -m pytest benchmarks/test_bench_step.py --benchmark-only
    python -m pytest benchmarks/test_bench_step.py --benchmark-only -k "adabreg and not compiled"

Providers that cannot run here (no compiled extension, no GPU) skip with the reason.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import DTYPES as TORCH_DTYPES  # noqa: E402
from cases import OPTIMIZERS, bytes_per_elt, make_reg, make_tensors, workload_shapes  # noqa: E402
from providers import ANCHOR_OPTIMIZER, ANCHOR_PROVIDERS, GPU_PROVIDERS, OUR_PROVIDERS  # noqa: E402
from providers import Skip, build_provider  # noqa: E402

WORKLOAD = "small"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = [p for p in OUR_PROVIDERS + ("copy",)]
DTYPES = ["fp32", "bf16"]
if os.environ.get("BENCH_THREADS"):  # e.g. BENCH_THREADS=1 on a busy shared CPU (see README)
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, provider, kind, dtype_name, reg_name="l1"):
    if provider in GPU_PROVIDERS and DEVICE.type != "cuda":
        pytest.skip(f"{provider} is a GPU provider and torch.cuda.is_available() is False")
    params, grads = make_tensors(workload_shapes(WORKLOAD), TORCH_DTYPES[dtype_name], DEVICE)
    try:
        fn = build_provider(provider, kind, params, grads, make_reg(reg_name), reg_name)
    except Skip as e:
        pytest.skip(str(e))
    for _ in range(3):  # lazy state, compilation
        fn()
    _sync()

    def step():
        fn()
        _sync()

    numel = sum(p.numel() for p in params)
    benchmark.extra_info.update(provider=provider, optimizer=kind, workload=WORKLOAD, dtype=dtype_name, numel=numel,
                                bytes_per_elt=bytes_per_elt(kind, TORCH_DTYPES[dtype_name]),
                                device=str(DEVICE))
    benchmark.group = f"{kind}-{dtype_name}"
    benchmark(step)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step(benchmark, provider, kind, dtype_name):
    _bench(benchmark, provider, kind, dtype_name)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("provider", ANCHOR_PROVIDERS)
def test_anchor(benchmark, provider, dtype_name):
    _bench(benchmark, provider, ANCHOR_OPTIMIZER[provider], dtype_name)


@pytest.mark.parametrize("provider", ["research-loop", "reference", "cpu", "triton", "cuda"])
def test_group_reg(benchmark, provider):
    """Row-group prox (GroupL1L2): the map that needs a per-row norm of the updated dual."""
    _bench(benchmark, provider, "linbreg", "fp32", reg_name="group")
