"""``report``: per layer shape, density, dead units, the format ``to_sparse`` picks, and the cost.

Columns: ``dead`` = output units with all-zero incoming weights (constant units, see ``shrink``);
``unused in`` = inputs the layer ignores (all-zero weight columns); ``format`` = ``csr`` for a
``SparseLinear``, else what ``to_sparse``'s calibrated rule would pick; ``MMACs`` = multiply-adds
per sample, dense and as exported (CSR layers: one per non-zero; convs need ``example_inputs`` for
their output size). ``save_sparse`` = bytes of the tensors' data in a sparse checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .convert import decide
from .graph import CONV, LINEAR
from .serialize import encoded_bytes
from .shrink import TRAIN_MODE_NOTE, as_inputs
from .sparse_linear import SparseLinear

__all__ = ["Report", "report"]


@dataclasses.dataclass
class Report:
    model: str
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    notes: list[str]

    @property
    def nothing_to_gain(self) -> bool:
        return any(n.startswith("nothing to gain") for n in self.notes)

    def __str__(self) -> str:
        head = ["layer", "kind", "shape", "density", "dead", "unused in", "format", "MMACs dense", "MMACs exported"]
        lines = [f"{self.model}:", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r["layer"], r["kind"], "×".join(map(str, r["shape"])), f"{r['density']:.4f}",
                     f"{r['dead']}/{r['units']}", str(r["unused_in"]), r["format"],
                     _mmacs(r["macs_dense"]), _mmacs(r["macs_exported"])]
            lines.append("| " + " | ".join(cells) + " |")
        t = self.totals
        lines.append(f"total: {t['params']:,} parameters, {t['nonzero']:,} non-zero weights (density "
                     f"{t['density']:.4f}); MMACs/sample dense {_mmacs(t['macs_dense'])}, exported "
                     f"{_mmacs(t['macs_exported'])}; data {t['dense_bytes']:,} B dense, {t['sparse_bytes']:,} B "
                     f"in save_sparse ({t['dense_bytes'] / max(t['sparse_bytes'], 1):.1f}× smaller)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _mmacs(macs: int | None) -> str:
    return "?" if macs is None else f"{macs / 1e6:.3f}"


@torch.no_grad()
def _positions(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Output positions per sample of every conv (from one eval-mode run)."""
    inputs = as_inputs(example_inputs)
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    out: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, CONV):
            hooks.append(m.register_forward_hook(
                lambda mod, args, y, name=name: out.__setitem__(name, y[0].numel() // y.shape[1] if batch else 0)))
    training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return out


def report(model: nn.Module, example_inputs: Any = None) -> Report:
    """The per-layer table of ``model`` (print it); ``example_inputs`` (optional) give the convs'
    output sizes for their MAC counts. Notes left by ``shrink``/``to_sparse`` are included."""
    positions = _positions(model, example_inputs) if example_inputs is not None else {}
    rows, notes = [], []
    totals = dict(params=0, nonzero=0, macs_dense=0, macs_exported=0, dense_bytes=0, sparse_bytes=0)
    gain = False
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            w, kind, fmt = m.weight.to_dense(), "Linear", "csr"
        elif isinstance(m, LINEAR + CONV):
            w, kind = m.weight.detach(), type(m).__name__
            fmt = "dense"
            if isinstance(m, LINEAR) and type(m) is nn.Linear and decide(m)[0]:
                fmt = "csr (to_sparse)"
        else:
            continue
        flat = w.reshape(w.shape[0], -1)
        nnz = int(torch.count_nonzero(flat))
        dead = int((~flat.bool().any(1)).sum())
        unused = int((~w.transpose(0, 1).reshape(w.shape[1], -1).bool().any(1)).sum())
        pos = positions.get(name) if isinstance(m, CONV) else 1
        macs_dense = None if pos is None else flat.numel() * pos
        macs_exported = None if pos is None else (nnz if fmt.startswith("csr") else flat.numel()) * pos
        gain |= dead > 0 or unused > 0 or fmt.startswith("csr")
        rows.append(dict(layer=name, kind=kind, shape=list(w.shape), density=nnz / max(flat.numel(), 1), dead=dead,
                         units=w.shape[0], unused_in=unused, format=fmt, macs_dense=macs_dense,
                         macs_exported=macs_exported))
        totals["nonzero"] += nnz
        totals["weights"] = totals.get("weights", 0) + flat.numel()
        for k, v in (("macs_dense", macs_dense), ("macs_exported", macs_exported)):
            totals[k] = None if v is None or totals[k] is None else totals[k] + v
    for t in model.state_dict().values():
        t = t.to_dense() if t.layout != torch.strided else t
        totals["params"] += t.numel() if t.is_floating_point() else 0
        totals["dense_bytes"] += t.numel() * t.element_size()
        totals["sparse_bytes"] += encoded_bytes(t)
    totals["density"] = totals["nonzero"] / max(totals.get("weights", 0), 1)
    if model.training:
        notes.append(TRAIN_MODE_NOTE)
    notes += list(getattr(model, "export_notes", []))
    if not rows:
        notes.append("nothing to gain: the model has no Linear or Conv layer")
    elif not gain and totals["sparse_bytes"] > 0.8 * totals["dense_bytes"]:
        notes.append(f"nothing to gain: every layer is dense (lowest density "
                     f"{min(r['density'] for r in rows):.3f}) and no unit is dead; shrink, to_sparse and "
                     "save_sparse would not make this model smaller or faster")
    return Report(type(model).__name__, rows, totals, notes)
