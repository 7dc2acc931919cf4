"""Which channels of a sparsely initialised conv net can learn: ``python -m bregman_fused.experiments.signal``.

A Bregman iteration switches a weight on only through its gradient, so a sparse init fixes which
parts of the network can ever grow. For every Conv layer, on one training batch (BatchNorm in
training mode, as in the first step):

    connected   fraction of output channels with a non-zero incoming kernel
    signal      fraction of output channels whose conv output differs between the batch's images
                (carries information about the input)
    trainable   fraction of output channels whose incoming kernels get a non-zero gradient
    grad        fraction of the layer's kernels with a non-zero gradient: those the first step can
                switch on

The command takes the training CLI's preset, optimizer and the flags that shape the init (see
``--help``) and prints one row per conv layer for the initialisation that run would start from.
The model is copied before the batch, so nothing about it changes. Training-only flags (--epochs,
--out-dir, --compare, --export …) are refused: nothing is trained here.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_channel_flow", "format_flow", "main"]


def conv_channel_flow(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """One dict per Conv2d of ``model`` (in forward order): name, channels, connected, signal,
    trainable, grad (fractions, see the module doc), after one forward/backward of (x, y)."""
    net = copy.deepcopy(model).train()
    convs = {m: name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    outputs: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o.detach())) for m in convs]
    try:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for m in outputs:  # the order the layers ran in
        w, g = m.weight.detach(), m.weight.grad
        g = torch.zeros_like(w) if g is None else g
        kernels_on = w.flatten(2).ne(0).any(2)  # (out, in)
        kernels_grad = g.flatten(2).ne(0).any(2)
        # signal = depends on the sample: a channel computed from constant inputs still varies over
        # the positions (zero padding), never over the batch
        out = outputs[m].transpose(0, 1).flatten(2)  # (channels, batch, positions)
        varies = out.std(1).amax(1) > 1e-6 * out.abs().amax((1, 2)).clamp_min(1e-30)
        rows.append(dict(name=convs[m], channels=w.shape[0], connected=float(kernels_on.any(1).float().mean()),
                         signal=float(varies.float().mean()), trainable=float(kernels_grad.any(1).float().mean()),
                         grad=float(kernels_grad.float().mean())))
    return rows


def format_flow(rows: list[dict[str, Any]]) -> str:
    lines = ["| conv layer | channels | connected | signal | trainable | kernels with gradient |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['channels']} | {r['connected']:.3f} | {r['signal']:.3f} | "
                     f"{r['trainable']:.3f} | {r['grad']:.4f} |")
    return "\n".join(lines)


PROG = "python -m bregman_fused.experiments.signal"
# the hyper-parameters that shape the model, its init and the measured batch (all else is training)
INIT_FIELDS = ("dataset", "model", "density", "sparse_linear", "sparse_conv", "init_scale", "init_scale_conv",
               "bn_shift", "batch_size")


def build_parser() -> argparse.ArgumentParser:
    from .presets import DEFAULT_PRESET, FIELDS, OPTIMIZERS, PRESETS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help="experiment (default: digits)")
    p.add_argument("--optim", choices=OPTIMIZERS, default=None,
                   help="the optimizer whose preset init to measure (default: the preset's)")
    init = p.add_argument_group("init (default: the preset's value for the optimizer)")
    for name in INIT_FIELDS:
        typ, help_text = FIELDS[name]
        choices = getattr(typ, "choices", None)
        init.add_argument("--" + name.replace("_", "-"), dest=name, type=str if choices else typ, choices=choices,
                          default=argparse.SUPPRESS,
                          help="the measured batch's size" if name == "batch_size" else help_text)
    p.add_argument("--seed", type=int, default=0, help="seeds the init and the batch drawn")
    p.add_argument("--data-dir", default="./data", help="root of the torchvision data sets")
    p.add_argument("--download", action="store_true", help="download the data set into --data-dir if missing")
    p.add_argument("--fake-data", type=int, default=None, metavar="N",
                   help="use torchvision FakeData (N training images) shaped like the data set")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = leave as is)")
    return p


def _training_only_flag(argv: Sequence[str], parser: argparse.ArgumentParser) -> str | None:
    """The first flag of ``argv`` that the training CLI knows and this command does not."""
    from ..train import build_parser as train_parser

    mine = set(parser._option_string_actions)
    training = set(train_parser()._option_string_actions) - mine
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in training:
            return flag
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; a training-only flag, a bad number or a model without conv layers
    ends the process as argparse does (one ``error:`` line, exit status 2)."""
    from . import flag_checks
    from .models import MODELS
    from .presets import PRESETS

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    flag = _training_only_flag(argv, parser)
    if flag:
        parser.error(f"{flag} is a training option: this command only measures the init a run starts from "
                     f"(nothing is trained or saved); drop it, or use python -m bregman_fused.train")
    args = parser.parse_args(argv)
    problem = flag_checks.bad_number(args) or flag_checks.inapplicable_flag(args)
    if problem:
        parser.error(problem)
    optim = args.optim or PRESETS[args.preset].optim
    model = vars(args).get("model", PRESETS[args.preset].resolved(optim)["model"])
    if model not in flag_checks.CONV_MODELS:
        with_convs = ", ".join(m for m in MODELS if m in flag_checks.CONV_MODELS)
        parser.error(f"--model {model} (preset {args.preset}) has no conv layers, so there is nothing to measure; "
                     f"pick a preset or --model with convs ({with_convs}), e.g. --preset convnet-mnist5k")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from . import data
    from .loop import init_weights
    from .models import build_model, input_size
    from .presets import FIELDS, resolve

    args = parse_args(argv)
    cfg = {**resolve(args.preset, args.optim, {k: v for k, v in vars(args).items() if k in FIELDS}),
           "seed": args.seed, "data_dir": args.data_dir, "download": args.download, "fake_data": args.fake_data,
           "threads": args.threads}
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    seed = int(cfg["seed"])
    try:
        splits = data.load(cfg["dataset"], cfg["data_dir"], cfg["download"], fake_size=cfg.get("fake_data"),
                           image_size=input_size(cfg["model"]))
        torch.manual_seed(seed)
        net = build_model(cfg["model"], splits.info.shape, splits.info.num_classes)
    except (data.DatasetNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_weights(net, cfg, torch.Generator().manual_seed(seed))
    # the first training batch's size, drawn from the training set
    idx = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))[:cfg["batch_size"]]
    x, y = zip(*(splits.train[int(i)] for i in idx))
    print(f"{cfg['model']} on {cfg['dataset']}, init density {cfg['density']:g} (linear {cfg['sparse_linear']}, "
          f"conv {cfg['sparse_conv']}), bn_shift {cfg['bn_shift']:g}, seed {seed}, batch {len(idx)}")
    print(format_flow(conv_channel_flow(net, torch.stack(x), torch.as_tensor([int(v) for v in y]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
