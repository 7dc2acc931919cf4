"""The experiment CLI's outputs: history files and plots, --compare, checkpoints and resume, and
the λ scheduler's feed.

Everything runs on scikit-learn's digits or torchvision FakeData (``--fake-data N``), with tiny
sizes (--max-batches, 1–3 epochs).
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from bregman_fused.experiments import checkpoint as ckpt
from bregman_fused.train import main, parse_args, train

from dcp_files import dcp_tensors
from test_experiments import FAST


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _same(a, b):
    """History equality that treats NaN == NaN (the autoencoder has no accuracy)."""
    assert len(a) == len(b)
    for ra, rb in zip(_strip(a), _strip(b)):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            assert va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb)), (k, va, vb)


# -- outputs --------------------------------------------------------------------------------------
def test_history_json_csv_and_plot_are_written(tmp_path):
    out = tmp_path / "run"
    hist = train(parse_args(["--epochs", "2", "--out-dir", str(out), *FAST]))
    saved = json.loads((out / "history.json").read_text())
    assert saved["config"]["preset"] == "digits" and saved["config"]["optim"] == "linbreg"
    nan_as_null = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in hist]
    assert _strip(saved["history"]) == _strip(nan_as_null)
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("train_acc", "val_acc", "test_acc", "density", "linear_density", "conv_kernel_density",
                "node_density", "reg", "reg_linear", "lr"):
        assert key in rows[0], key
    # the digits MLP has no convs: its conv-kernel density is NaN ("nan" / null), not 0.0
    assert [r["conv_kernel_density"] for r in rows] == ["nan", "nan"]
    assert [r["conv_kernel_density"] for r in saved["history"]] == [None, None]
    assert float(rows[0]["linear_density"]) == hist[0]["linear_density"] < 0.1
    png = (out / "history.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _rows(epochs, convs=True, classification=True):
    return [dict(epoch=e, train_loss=1.0 / e, val_loss=1.1 / e, test_loss=1.2 / e,
                 train_acc=0.5 if classification else math.nan, val_acc=0.6 if classification else math.nan,
                 test_acc=0.7 if classification else math.nan, density=0.01 * e, linear_density=0.02 * e,
                 conv_kernel_density=0.005 * e if convs else math.nan, node_density=0.5) for e in range(1, epochs + 1)]


def _lines(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_plot_has_loss_curves_the_density_split_and_integer_epochs(tmp_path):
    from bregman_fused.experiments import history as hist

    fig = hist.figure({"": _rows(3)}, "convnet / linbreg")
    acc, loss, dens = fig.axes
    assert [a.get_title() for a in fig.axes] == ["accuracy", "loss", "density"]
    assert fig._suptitle.get_text() == "convnet / linbreg"
    assert _lines(acc) == ["test", "val"]
    assert _lines(loss) == ["train", "val", "test"] and loss.get_yscale() == "log"
    assert _lines(dens) == ["all weights", "linear", "conv kernels", "nodes"]
    fig.canvas.draw()
    for a in fig.axes:
        assert a.get_xlabel() == "epoch"
        ticks = [t for t in a.get_xticks() if 1 <= t <= 3]
        assert ticks == [1, 2, 3], ticks  # whole epochs only, no 1.5
    # an MLP (no conv kernels): no conv curve and no linear curve equal to "all weights"
    fig = hist.figure({"sgd": _rows(2, convs=False), "linbreg": _rows(2, convs=False)})
    assert _lines(fig.axes[2]) == ["sgd all weights", "sgd nodes", "linbreg all weights", "linbreg nodes"]
    # the autoencoder: no accuracy panel
    fig = hist.figure({"": _rows(2, classification=False)})
    assert [a.get_title() for a in fig.axes] == ["loss", "density"] and fig.axes[0].get_ylabel() == "loss (MSE)"
    path = hist.plot_history(_rows(4), str(tmp_path / "h.png"), "t")
    assert open(path, "rb").read()[:4] == b"\x89PNG"


def test_compare_writes_each_run_and_the_combined_plot(tmp_path):
    out = tmp_path / "cmp"
    assert main(["--compare", "sgd", "linbreg", "proxsgd", "adabreg", "--epochs", "1", "--out-dir", str(out),
                 *FAST]) == 0
    for o in ("sgd", "linbreg", "proxsgd", "adabreg"):
        assert (out / o / "history.json").exists() and (out / o / "checkpoint").is_dir()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    finals = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["optim"] for r in finals] == ["sgd", "linbreg", "proxsgd", "adabreg"]
    dens = {r["optim"]: float(r["density"]) for r in finals}
    assert dens["sgd"] == 1.0 and dens["linbreg"] < 0.1  # dense baseline vs sparse Bregman start


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    # digits (tensor fast path), AdaBreg, LR plateau schedule that fires and a λ scheduler
    ["--optim", "adabreg", "--plateau-patience", "0", "--lr-schedule", "plateau", "--target-density", "0.0"],
    # the DataLoader path with random augmentation (global RNG) on 3-channel FakeData
    ["--preset", "densenet-fashionmnist", "--dataset", "cifar10", "--augment", "true", "--fake-data", "24",
     "--batch-size", "8", "--max-batches", "2"],
], ids=["digits-adabreg", "fakedata-augmented"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, argv):
    common = [*argv, "--backend", "reference", "--no-plot", *FAST]
    full = train(parse_args([*common, "--epochs", "3", "--out-dir", str(tmp_path / "full")]))
    first = train(parse_args([*common, "--epochs", "1", "--out-dir", str(tmp_path / "part")]))
    resumed = train(parse_args([*common, "--epochs", "3", "--out-dir", str(tmp_path / "part"), "--resume"]))
    _same(first, full[:1])
    _same(resumed, full)
    a, b = dcp_tensors(str(tmp_path / "full" / "checkpoint")), dcp_tensors(str(tmp_path / "part" / "checkpoint"))
    assert a.keys() == b.keys() and len(a) > 4
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical params and optimizer states


def test_bad_checkpoints_fail_loudly(tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args(["--epochs", "1", "--out-dir", str(out), "--no-plot", *FAST]))
    cdir = out / "checkpoint"
    # a different optimizer / preset is another run
    assert main(["--optim", "adabreg", "--epochs", "2", "--out-dir", str(out), "--resume", *FAST]) == 2
    assert "belongs to a different run" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="preset"):
        train(parse_args(["--preset", "mlp-mnist", "--fake-data", "8", "--epochs", "2", "--out-dir", str(out),
                          "--resume", *FAST]))
    # a hyper-parameter given anew on resume is a mismatch, not silently the checkpoint's (or the new) value
    with pytest.raises(ckpt.CheckpointError, match=r"lr: checkpoint 0\.1 vs this run 0\.05"):
        train(parse_args(["--epochs", "2", "--lr", "0.05", "--out-dir", str(out), "--resume", *FAST]))
    with pytest.raises(ckpt.CheckpointError, match="batch_size"):
        train(parse_args(["--epochs", "2", "--batch-size", "64", "--out-dir", str(out), "--resume", *FAST]))
    with pytest.raises(ckpt.CheckpointError, match="target_density"):
        train(parse_args(["--epochs", "2", "--target-density", "0.05", "--out-dir", str(out), "--resume", *FAST]))
    # no checkpoint at all
    assert main(["--epochs", "2", "--out-dir", str(tmp_path / "none"), "--resume", *FAST]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # a truncated model shard
    shard = next(p for p in cdir.iterdir() if p.suffix == ".distcp")
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 3])
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        train(parse_args(["--epochs", "2", "--out-dir", str(out), "--resume", *FAST]))
    shard.write_bytes(good)
    # garbage train state, then a missing one (an interrupted save)
    state = cdir / "train_state.pt"
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        train(parse_args(["--epochs", "2", "--out-dir", str(out), "--resume", *FAST]))
    state.unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        train(parse_args(["--epochs", "2", "--out-dir", str(out), "--resume", *FAST]))


def test_lamda_scheduler_is_fed_the_density_of_the_group_it_steers(monkeypatch):
    # the scheduler steers group 0 (the Linear weights); on a conv net the overall density mixes in
    # the conv weights and would steer λ toward the wrong number
    from bregman_fused import schedulers

    seen = []
    original = schedulers.LamdaScheduler.step
    monkeypatch.setattr(schedulers.LamdaScheduler, "step",
                        lambda self, density=None: seen.append(density) or original(self, density))
    hist = train(parse_args(["--preset", "convnet-fashionmnist", "--fake-data", "24", "--batch-size", "8",
                             "--max-batches", "2", "--epochs", "2", "--target-density", "0.05", *FAST]))
    assert seen == [row["linear_density"] for row in hist]
    assert all(row["linear_density"] != row["density"] for row in hist)  # the two really differ here
