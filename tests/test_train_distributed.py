"""The train CLI under torchrun: 2 gloo processes with --fsdp, a DCP checkpoint, resume on 1 rank;
and with DDP (no --fsdp): logging on rank 0 only, the same training as one process.

Each launch is a real ``torchrun --standalone`` (it picks a free port, so parallel test runs do not
collide) and is killed after ``TIMEOUT_S``. The data order is DistributedSampler's permutation of
(seed, epoch) on every world size, so with ``--max-batches 9`` (9 full global batches of 128 out of
digits' 1279 training images) the 1-rank continuation sees exactly the batches of the 2-rank one:
their parameters agree to fp tolerance (only the gradient reduction order differs).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from dcp_files import dcp_tensors

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120
ARGS = ["--epochs", "{epochs}", "--max-batches", "9", "--backend", "auto", "--device", "cpu", "--quiet",
        "--no-plot", "--out-dir", "{out}"]


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _cmd(ranks: int, out, epochs: int, *extra: str) -> list[str]:
    args = [a.format(epochs=epochs, out=out) for a in ARGS] + list(extra)
    if ranks == 1:
        return [sys.executable, "-m", "bregman_fused.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "-m", "bregman_fused.train", "--fsdp", *args]


def _launch(cmds: list[list[str]]) -> list[str]:
    """Run the commands side by side and return their output; fail (and kill them) after TIMEOUT_S."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in cmds]
    outputs = []
    try:
        for c, p in zip(cmds, procs):
            out, _ = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, f"{' '.join(c)} failed ({p.returncode}):\n{out[-4000:]}"
            outputs.append(out)
        return outputs
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed training did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)  # the launcher and its workers (own session)
                p.wait()


def _history(out) -> list[dict]:
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)["history"]


def test_fsdp_cli_checkpoint_resumes_on_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # 2 FSDP2 ranks for 2 epochs, keeping the epoch-1 DCP checkpoint: the uninterrupted 2-rank run
    _launch([_cmd(2, two, 2, "--keep-checkpoints")])
    h2 = _history(two)
    assert [r["epoch"] for r in h2] == [1, 2]
    assert all(math.isfinite(h2[0][k]) for k in ("train_loss", "test_acc", "density", "reg"))
    assert 0.0 < h2[0]["density"] < 0.1  # 1 %-dense LinBreg start, growing
    epoch1 = two / "checkpoint-epoch0001"
    assert sorted(p.name for p in epoch1.iterdir() if p.suffix == ".distcp") == \
        ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its shards
    # resume the epoch-1 checkpoint in 1 process
    _launch([_cmd(1, one, 2, "--resume", str(epoch1))])
    h1 = _history(one)
    assert [r["epoch"] for r in h1] == [1, 2]
    assert h1[0] == h2[0]  # the first epoch comes from the checkpoint
    for key in ("train_loss", "val_loss", "test_loss", "density", "reg"):
        assert math.isfinite(h1[1][key]), key
        assert h1[1][key] == pytest.approx(h2[1][key], rel=1e-4, abs=1e-6), key
    a, b = dcp_tensors(str(one / "checkpoint")), dcp_tensors(str(two / "checkpoint"))
    assert a.keys() == b.keys() and any(k.startswith("model.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-5, atol=2e-6, msg=k)
    state = torch.load(one / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 1 and state["epoch"] == 2


def test_ddp_cli_logs_on_rank_0_only_and_matches_one_process(tmp_path):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    cmd = [a for a in _cmd(2, ddp, 1) if a not in ("--fsdp", "--quiet")] + ["--no-progress"]
    (out,) = _launch([cmd])
    assert out.count("epoch   1") == 1, out[-3000:]  # one log line per epoch, from rank 0
    _launch([_cmd(1, one, 1)])
    h2, h1 = _history(ddp), _history(one)
    for key in ("train_loss", "test_loss", "density", "reg"):
        assert h2[0][key] == pytest.approx(h1[0][key], rel=1e-4, abs=1e-6), key
    a, b = dcp_tensors(str(ddp / "checkpoint")), dcp_tensors(str(one / "checkpoint"))
    assert a.keys() == b.keys() and any(k.startswith("model.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-5, atol=2e-6, msg=k)
