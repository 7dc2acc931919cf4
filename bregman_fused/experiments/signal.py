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

The command takes the training CLI's arguments (preset and overrides) and prints one row per conv
layer for the initialisation that run would start from. The model is copied before the batch, so
nothing about it changes.
"""
from __future__ import annotations

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


def main(argv: Sequence[str] | None = None) -> int:
    from ..train import parse_args, resolve_args
    from . import data
    from .loop import init_weights
    from .models import build_model, input_size

    args = parse_args(argv)
    cfg = resolve_args(args)
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
