"""Command-line input the train, export and signal CLIs must refuse in one ``error:`` line naming
the flag (exit status 2, no traceback) instead of running something else than asked."""
from __future__ import annotations

import os

import pytest
import torch

from bregman_fused.train import main, parse_args, resolve_args

QUICK = ["--epochs", "1", "--max-batches", "1", "--no-plot", "--no-progress", "--device", "cpu", "--quiet"]


def _refused(capsys, argv, *words):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "error:" in err and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("argv, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-5"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--max-batches", "-1"], "--max-batches"),
    (["--threads", "-1"], "--threads"),
    (["--num-workers", "-2"], "--num-workers"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--preset", "mlp-mnist", "--lr-schedule", "plateau", "--plateau-factor", "2"], "--plateau-factor"),
    (["--device", "meta"], "--device"),
])
def test_bad_numbers_and_devices_are_refused_naming_the_flag(capsys, argv, flag):
    _refused(capsys, argv, flag)


def test_max_batches_0_still_means_no_limit():
    assert resolve_args(parse_args(["--max-batches", "0"]))["max_batches"] == 0
    assert main(["--epochs", "1", "--max-batches", "0", "--no-plot", "--no-progress", "--device", "cpu",
                 "--quiet"]) == 0


@pytest.mark.parametrize("argv, flag, why", [
    (["--moments", "8bit"], "--moments", "--momentum 0"),
    (["--optim", "adabreg", "--momentum", "0.9"], "--momentum", "adabreg"),
    (["--optim", "proxsgd", "--momentum", "0.9"], "--momentum", "proxsgd"),
    (["--optim", "proxsgd", "--moments", "bf16"], "--moments", "ProxSGD"),
    (["--optim", "proxsgd", "--delta", "2"], "--delta", "ProxSGD"),
    (["--lamda-conv", "0.1"], "--lamda-conv", "no conv layers"),
    (["--conv-reg", "l1"], "--conv-reg", "no conv layers"),
    (["--bn-shift", "0.1"], "--bn-shift", "no BatchNorm"),
    (["--preset", "convnet-fashionmnist", "--bn-shift", "0.1"], "--bn-shift", "no BatchNorm"),
    (["--plateau-factor", "0.5"], "--plateau-factor", "lr schedule"),
    (["--preset", "mlp-mnist", "--lr-schedule", "none", "--plateau-patience", "2"], "--plateau-patience", "none"),
    (["--augment", "true"], "--augment", "digits"),
    (["--keep-checkpoints"], "--keep-checkpoints", "--out-dir"),
    (["--download"], "--download", "digits"),
    (["--lamda-step", "0.1"], "--lamda-step", "--target-density"),
    (["--compare", "linbreg", "proxsgd", "--moments", "8bit"], "--moments", "none of the compared"),
    (["--compare", "adabreg", "proxsgd", "--momentum", "0.9"], "--momentum", "none of the compared"),
])
def test_options_the_run_would_ignore_are_refused(capsys, argv, flag, why):
    _refused(capsys, argv, flag, why)


def test_values_that_ask_for_nothing_pass_where_their_option_does_not_apply():
    # as the optimizers pass torch.optim's no-op options: a sweep may give --momentum 0 to every optimizer
    for argv in (["--optim", "adabreg", "--momentum", "0"], ["--optim", "linbreg", "--moments", "fp32"],
                 ["--optim", "proxsgd", "--delta", "1"], ["--optim", "sgd", "--lamda", "0"]):
        parse_args(argv)
    assert resolve_args(parse_args(["--optim", "adabreg", "--momentum", "0"]))["momentum"] == 0.0


def test_augment_applies_to_mnist5k_through_fake_data():
    # --fake-data takes mnist5k through the torchvision path, which augments (data.load)
    parse_args(["--preset", "mlp-mnist5k", "--fake-data", "32", "--augment", "true"])


def test_a_presets_own_values_do_not_count_as_given():
    # vgg13-mnist5k sets bn_shift 0.1 and the plateau keys (lr schedule none); resnet18 sets augment
    for argv in (["--preset", "vgg13-mnist5k", "--optim", "proxsgd"], ["--preset", "resnet18-cifar10"],
                 ["--preset", "resnet18-cifar10", "--dataset", "fashionmnist", "--model", "densenet"]):
        parse_args(argv)
    cfg = resolve_args(parse_args(["--momentum", "0.9", "--moments", "8bit"]))
    assert (cfg["momentum"], cfg["moments"]) == (0.9, "8bit")


def test_compare_gives_each_flag_to_the_optimizers_it_concerns():
    args = parse_args(["--compare", "sgd", "linbreg", "adabreg", "proxsgd", "--lamda", "0.2", "--momentum", "0.5",
                       "--moments", "bf16", "--delta", "2"])
    cfgs = {o: resolve_args(args, o) for o in args.compare}
    assert cfgs["sgd"]["lamda"] == 0.0 and cfgs["linbreg"]["lamda"] == cfgs["adabreg"]["lamda"] == 0.2
    assert cfgs["sgd"]["momentum"] == cfgs["linbreg"]["momentum"] == 0.5 and cfgs["adabreg"]["momentum"] == 0.0
    assert cfgs["adabreg"]["moments"] == "bf16" and cfgs["proxsgd"]["moments"] == "fp32"
    assert cfgs["linbreg"]["delta"] == cfgs["adabreg"]["delta"] == 2.0 and cfgs["proxsgd"]["delta"] == 1.0


# -- python -m bregman_fused.export -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """(a single run's --out-dir, a --compare run's --out-dir), one batch each."""
    root = tmp_path_factory.mktemp("runs")
    assert main([*QUICK, "--out-dir", str(root / "run")]) == 0
    assert main([*QUICK, "--compare", "sgd", "linbreg", "--out-dir", str(root / "cmp")]) == 0
    return root / "run", root / "cmp"


def _export_refused(capsys, argv, *words):
    from bregman_fused.export.cli import main as export_main

    with pytest.raises(SystemExit) as exit_:
        export_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error:" in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("extra, flag", [(["--batch", "0"], "--batch"), (["--batch", "-2"], "--batch"),
                                         (["--measure-batch", "0"], "--measure-batch")])
def test_export_refuses_batches_below_1(capsys, tmp_path, trained_runs, extra, flag):
    _export_refused(capsys, [str(trained_runs[0]), "--out", str(tmp_path / "out"), *extra], flag)


def test_export_refuses_an_out_that_is_a_file_or_empty(capsys, tmp_path, trained_runs):
    (tmp_path / "file").write_text("")
    _export_refused(capsys, [str(trained_runs[0]), "--out", str(tmp_path / "file")], "--out", "is a file")
    _export_refused(capsys, [str(trained_runs[0]), "--out", ""], "--out is empty")


def test_export_of_a_folder_that_is_no_checkpoint_says_so(capsys, tmp_path, trained_runs):
    from bregman_fused.export.cli import main as export_main

    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint folder" in err and "incomplete" not in err
    cmp = trained_runs[1]
    assert export_main([str(cmp), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint folder" in err and str(cmp / "linbreg") in err and str(cmp / "sgd") in err
    # a checkpoint folder cut short (DCP's shards without the train state) is still called incomplete
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "__0_0.distcp").write_bytes(b"")
    assert export_main([str(cut), "--out", str(tmp_path / "out")]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert export_main([str(trained_runs[0]), "--out", str(tmp_path / "out"), "--quiet"]) == 0


# -- --out-dir: a single run and a --compare never share a folder -----------------------------------
def test_a_single_run_into_a_compare_folder_and_back_is_refused_unless_overwrite(capsys, tmp_path, trained_runs):
    import shutil

    single, compared = tmp_path / "single", tmp_path / "compared"
    shutil.copytree(trained_runs[0], single)
    shutil.copytree(trained_runs[1], compared)
    assert main([*QUICK, "--out-dir", str(compared)]) == 2
    err = capsys.readouterr().err
    assert "--out-dir" in err and "--compare run" in err and "--overwrite" in err
    assert main([*QUICK, "--compare", "sgd", "adam", "--out-dir", str(single)]) == 2
    err = capsys.readouterr().err
    assert "--out-dir" in err and "single run" in err and "--overwrite" in err
    assert (compared / "compare.json").exists() and (single / "checkpoint").exists()  # nothing was touched

    assert main([*QUICK, "--out-dir", str(compared), "--overwrite"]) == 0
    assert sorted(p.name for p in compared.iterdir()) == ["checkpoint", "history.csv", "history.json"]
    assert main([*QUICK, "--compare", "sgd", "adam", "--out-dir", str(single), "--overwrite"]) == 0
    assert sorted(p.name for p in single.iterdir()) == ["adam", "compare.csv", "compare.json", "sgd"]


# -- python -m bregman_fused.experiments.signal --------------------------------------------------------
def test_signal_has_its_own_help(capsys):
    from bregman_fused.experiments import signal

    with pytest.raises(SystemExit) as exit_:
        signal.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "bregman_fused.experiments.signal" in out
    assert "--bn-shift" in out and "--epochs" not in out and "--compare" not in out


@pytest.mark.parametrize("argv, words", [
    (["--preset", "convnet-mnist5k", "--epochs", "3"], ["--epochs", "training option"]),
    (["--preset", "convnet-mnist5k", "--out-dir=x"], ["--out-dir", "training option"]),
    (["--preset", "convnet-mnist5k", "--compare", "sgd"], ["--compare", "training option"]),
    (["--preset", "convnet-mnist5k", "--export"], ["--export", "training option"]),
    (["--preset", "convnet-mnist5k", "--batch-size", "0"], ["--batch-size"]),
    ([], ["no conv layers", "mlp"]),
    (["--preset", "vgg13-mnist5k", "--model", "mlp"], ["no conv layers", "--model mlp"]),
])
def test_signal_refuses_training_flags_bad_numbers_and_models_without_convs(capsys, argv, words):
    from bregman_fused.experiments import signal

    with pytest.raises(SystemExit) as exit_:
        signal.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error:" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# -- --download -----------------------------------------------------------------------------------------
class _Offline:
    """A torchvision data set class whose download fails as without a network."""

    def __init__(self, root, train=True, download=False, transform=None):
        import urllib.error

        if download:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.invalid/, got:\n"
                               f"{urllib.error.URLError('Name or service not known')}")
        raise RuntimeError("Dataset not found. You can use download=True to download it")


def test_a_failed_download_is_one_error_line_naming_the_data_set_and_folder(capsys, tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", _Offline)
    assert main(["--preset", "mlp-mnist", "--download", "--data-dir", str(tmp_path), *QUICK]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err, err
    assert "MNIST" in err and str(tmp_path) in err and "without --download" in err and "Name or service" in err


class _Recorded:
    """A small data set that logs (rank, download) when built; rank 0's download takes 0.3 s."""

    def __init__(self, root, train=True, download=False, transform=None):
        import time

        import torch.distributed as dist

        rank = dist.get_rank()
        with open(os.path.join(root, "log"), "a") as f:
            f.write(f"{rank} {int(download)} start {time.time()}\n")
        if download:
            if os.environ.get("OFFLINE_RANK0") == "1":
                raise RuntimeError("Error downloading: no network")
            time.sleep(0.3)
        with open(os.path.join(root, "log"), "a") as f:
            f.write(f"{rank} {int(download)} end {time.time()}\n")

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.zeros(1, 28, 28), 0


def _download_worker(rank, world, init_file, root, offline):
    import torch.distributed as dist

    from bregman_fused.experiments import data

    os.environ["OFFLINE_RANK0"] = "1" if offline else "0"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data.load("mnist", root, download=True, dataset_cls=_Recorded)
        outcome = "ok"
    except data.DatasetNotFoundError as e:
        outcome = f"DatasetNotFoundError {e}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(root, f"outcome{rank}"), "w") as f:
        f.write(outcome)


@pytest.mark.parametrize("offline", [False, True])
def test_under_a_process_group_rank_0_downloads_first_and_the_others_wait(tmp_path, offline):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    procs = mp.spawn(_download_worker, args=(2, str(tmp_path / "store"), str(tmp_path), offline), nprocs=2,
                     join=False)
    for p in procs.processes:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs.processes), [p.exitcode for p in procs.processes]
    outcomes = [(tmp_path / f"outcome{r}").read_text() for r in (0, 1)]
    if offline:  # rank 0's failure reaches rank 1 (no rank waits forever)
        assert all(o.startswith("DatasetNotFoundError") and "no network" in o for o in outcomes), outcomes
        return
    assert outcomes == ["ok", "ok"]
    events = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    rank1 = [e for e in events if e[0] == "1"]
    assert rank1 and all(e[1] == "0" for e in rank1)  # the others never download
    rank0_done = max(float(e[3]) for e in events if e[0] == "0" and e[2] == "end")
    assert min(float(e[3]) for e in rank1) >= rank0_done  # ... and load only once rank 0 is done
