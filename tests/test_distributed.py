"""DDP and FSDP2 on 2 CPU processes (gloo, loopback) against a single unsharded process."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_workers as W
import bregman_fused as bf

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
TIMEOUT_S = 120


def _spawn(fn, tmp_path, *args):
    init_file = str(tmp_path / "init")
    ctx = mp.start_processes(fn, args=(WORLD, init_file, str(tmp_path), *args), nprocs=WORLD, join=False,
                             start_method="spawn")
    # bounded in time: a hung collective fails the test instead of hanging CI. join() returns
    # after each process that ends (True once all have); it raises if a worker failed
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    return torch.load(tmp_path / "result.pt", weights_only=True)


def _single(name, reg, backend):
    m = W.model()
    opt = W.optimizer(m, name, reg, backend)
    W.train(m, opt, W.batches())
    return W.full_params(m), opt


def _assert_close(params, expected):
    for a, b in zip(params, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# one spawn per test runs all its combinations: starting 2 processes costs seconds each time
COMBOS = [("linbreg", "l1"), ("linbreg", "group"), ("adabreg", "l1"), ("adabreg", "group")]


def test_ddp_matches_single_process(tmp_path):
    combos = [("linbreg", "l1"), ("adabreg", "group")]
    results = _spawn(W.ddp_worker, tmp_path, combos, "auto")
    for name, reg in combos:
        got = results[f"{name}-{reg}"]
        expected, opt = _single(name, reg, "auto")
        _assert_close(got["params"], expected)
        assert got["density"] == pytest.approx(opt.density())


# "auto" is the fused C++ backend here; the reference shows the plain per-tensor path on shards too
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fsdp2_matches_unsharded(tmp_path, backend):
    results = _spawn(W.fsdp_worker, tmp_path, COMBOS, backend)
    for name, reg in COMBOS:
        got = results[f"{name}-{reg}"]
        expected, opt = _single(name, reg, backend)
        _assert_close(got["params"], expected)
        # density and J(θ) are global values (summed over the shards), equal to the unsharded ones
        assert got["density"] == pytest.approx(opt.density(), abs=1e-6), (name, reg)
        assert got["reg"] == pytest.approx(opt.evaluate_reg(), rel=1e-5), (name, reg)
        assert 0.0 < got["density"] < 1.0, (name, reg)  # the regularizer did something


def test_checkpoint_from_two_ranks_resumes_on_one(tmp_path):
    after = 2
    got = _spawn(W.fsdp_worker, tmp_path, [("adabreg", "group")], "auto", after)["adabreg-group"]
    resumed, _ = W.resume_single_process(str(tmp_path), "adabreg", "group", "auto", after)
    expected, _ = _single("adabreg", "group", "auto")
    _assert_close(resumed, expected)
    _assert_close(resumed, got["params"])


MOMENT_COMBOS = [("adabreg", "8bit"), ("adabreg", "bf16"), ("linbreg", "8bit")]


def _assert_close_but_rare_flips(a, b, what):
    """Equal up to float noise, except where a rounding decision (an 8-bit code, a bf16 threshold)
    flipped on the grads' last bits (another reduction order): that moves an element by a fraction
    of lr, and is rare."""
    off = (a - b).abs() > 1e-6 + 1e-4 * b.abs()
    assert off.float().mean().item() <= 1e-3 and (a - b).abs().max().item() <= 1e-3, what


def test_fsdp2_compact_moments_match_one_process(tmp_path):
    """8-bit blocks follow dim-0 rows, so no block straddles two shards: the sharded run stores the
    same codes and scales as one process (within one code where the all-reduced grads differ in
    their last bits), and trains the same params."""
    results = _spawn(W.fsdp_moments_worker, tmp_path, MOMENT_COMBOS, "auto")
    for name, fmt in MOMENT_COMBOS:
        got = results[f"{name}-{fmt}"]
        m = W.moments_model()
        opt = W.moments_optimizer(m, name, fmt, "auto")
        W.train(m, opt, W.batches())
        for a, b in zip(got["params"], [p.detach() for p in m.parameters()]):
            _assert_close_but_rare_flips(a, b, (name, fmt))
        for i, w in enumerate([m[1].weight, m[3].weight]):
            for key, ref in opt.state[w].items():
                shard_run = got["states"][f"{i}.{key}"]
                assert shard_run.dtype == ref.dtype and shard_run.shape == ref.shape, (name, fmt, key)
                if ref.dtype in (torch.int8, torch.uint8, torch.bfloat16):
                    a = shard_run.view(torch.int16) if ref.dtype == torch.bfloat16 else shard_run
                    b = ref.view(torch.int16) if ref.dtype == torch.bfloat16 else ref
                    assert (a.int() - b.int()).abs().max() <= 1, (name, fmt, key)
                else:
                    _assert_close_but_rare_flips(shard_run, ref, (name, fmt, key))
        if fmt == "8bit":
            assert opt.state[m[3].weight]["exp_avg" if name == "adabreg" else "momentum_buffer"].dtype == torch.int8


RELOAD_COMBOS = [("adabreg", "fp32>fp32"), ("adabreg", "8bit>8bit"), ("adabreg", "bf16>bf16"),
                 ("adabreg", "fp32>8bit"), ("linbreg", "8bit>fp32")]


def test_fsdp2_sharded_states_reload_in_any_moments_format(tmp_path):
    """load_state_dict of DTensor states: the same format continues bit for bit, another converts."""
    results = _spawn(W.fsdp_moments_reload_worker, tmp_path, RELOAD_COMBOS, "auto")
    for name, formats in RELOAD_COMBOS:
        got = results[f"{name}-{formats}"]
        src, dst = formats.split(">")
        want = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "8bit": "torch.int8"}[dst]
        moment = "exp_avg" if name == "adabreg" else "momentum_buffer"
        assert got["state_dtypes"][moment] == want, (name, formats, got["state_dtypes"])
        for a, b in zip(got["reloaded"], got["params"]):
            if src == dst:
                assert torch.equal(a, b), (name, formats)
            else:
                # the moments were rounded once by the conversion: most elements barely move, a few
                # (a small m coded to 0) take another step, at most lr per remaining step (2 × 1e-2)
                off = (a - b).abs() > 2e-3 + 0.05 * b.abs()
                assert off.float().mean().item() <= 0.01 and (a - b).abs().max().item() <= 0.02, (name, formats)


def _shard1_worker(rank, world, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    W._init(rank, world, init_file)
    try:
        mesh = init_device_mesh("cpu", (world,))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        errors = {}
        for name, reg in [("group", bf.GroupL1L2(0.1)), ("l1", bf.L1(0.1))]:
            try:
                bf.LinBreg([w], reg=reg)
                errors[name] = ""
            except ValueError as e:
                errors[name] = str(e)
        if rank == 0:
            torch.save(errors, os.path.join(out_dir, "result.pt"))
        W._finish()
    finally:
        dist.destroy_process_group()
    W.exit_now()


def test_row_splitting_sharding_is_refused(tmp_path):
    errors = _spawn(_shard1_worker, tmp_path)
    assert "splits them across ranks" in errors["group"]
    assert errors["l1"] == ""  # element-wise maps are exact on any shard


def test_fsdp2_with_a_rank_holding_no_rows_and_the_lamda_scheduler(tmp_path):
    """A weight of one row (4096 elements, 8-bit moments) leaves rank 1 an empty shard, which steps
    like the others; the λ scheduler counts the group's density over all ranks, so every rank sets
    the same λ as one process."""
    results = _spawn(W.fsdp_few_rows_worker, tmp_path, [("adabreg", "8bit"), ("adabreg", "fp32")], "auto")
    for fmt in ("8bit", "fp32"):
        got = results[f"adabreg-{fmt}"]
        m = W.few_rows_model()
        opt = bf.AdaBreg([{"params": [m[1].weight, m[3].weight], "reg": bf.L1(0.5)},
                          {"params": [m[1].bias, m[3].bias, m[4].weight, m[4].bias]}], lr=1e-2, moments=fmt, backend="auto")
        W.train(m, opt, W.batches())
        sched = bf.LamdaScheduler(opt, 0, target_density=0.01)
        assert got["density"] == pytest.approx(sched.group_density(), rel=1e-3), fmt
        sched.step()
        assert got["lamdas"].tolist() == [pytest.approx(sched.lamda)] * WORLD, fmt
        for a, b in zip(got["params"], [p.detach() for p in m.parameters()]):
            _assert_close_but_rare_flips(a, b, fmt)
