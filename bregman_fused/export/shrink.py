"""``shrink``: a dense model without the units whose output cannot matter, with the same outputs.

A group of units (``graph.Group``: output units of Linear/Conv layers tied together by residual
adds, concatenations, BatchNorm) is removed when every layer that reads it either

* has all-zero weights on it (nothing flows on), or
* reads a value that does not depend on the input — every producer in the group has all-zero
  incoming weights, so its output is its bias, passed through BatchNorm (eval) and activations —
  and that value can be moved exactly into the reader's bias: a Linear reads a number per feature
  (bias += W[:, k]·v; a dead MLP neuron outputs act(b), which is folded, never dropped); a Conv
  reads a constant map, which folds only if the conv of that map is the same at every output
  position — true for a zero value or a padding that repeats the map, false for a non-zero
  constant feeding a zero-padded conv (its border outputs differ), which therefore stays.

Values are the ones the layers actually read on the example inputs (recorded by ``graph.trace``),
checked to be the same for every sample. Removing units can leave others dead (a neuron whose only
outgoing weights went to removed neurons), so rounds repeat until nothing changes. Every layer
keeps at least one output unit (BatchNorm and most ops cannot run on zero channels). Finally the
shrunk model is run on the example inputs and on a perturbed copy and must match the original's
outputs within ``atol`` (default: 1e-5 for float32/float64 models; for a bf16/fp16 model four ulps of
its dtype at 1, since folding a dead unit's constant into the next bias rounds differently);
otherwise ``ExportError`` is raised.

Export works on the model in eval mode: BatchNorm uses its running statistics (frozen), dropout is
off. A model in train mode gets a warning and an eval-mode result.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import graph
from .errors import ExportError

__all__ = ["shrink", "as_inputs", "TRAIN_MODE_NOTE"]

TRAIN_MODE_NOTE = ("the model is in train mode: export works on it in eval mode (BatchNorm statistics frozen at "
                   "their running values, dropout off); the result is in eval mode")
_MAX_ROUNDS = 32


def as_inputs(example_inputs: Any) -> tuple:
    """``example_inputs`` as the tuple of positional arguments of ``model(...)``."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ExportError(f"example_inputs must be a tensor or a tuple of tensors (the positional arguments of "
                          f"model(...)), got {type(example_inputs).__name__}")
    return tuple(inputs)


@dataclasses.dataclass
class _Plan:
    remove_out: dict[str, set[int]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    remove_in: dict[str, set[int]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    remove_norm: dict[str, set[int]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    bias_delta: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # float64, per output unit


class _Notes:
    """Per layer: units removed (by why) and dead units kept (by why)."""

    def __init__(self) -> None:
        self.unsupported: list[str] = []
        self.removed: dict[str, Counter] = defaultdict(Counter)
        self.kept: dict[str, Counter] = defaultdict(Counter)
        self.before: dict[str, int] = {}

    def lines(self) -> list[str]:
        out = []
        for name in self.before:
            if name in self.removed:
                why = ", ".join(f"{n} {k}" for k, n in self.removed[name].items())
                out.append(f"{name}: removed {sum(self.removed[name].values())} of {self.before[name]} units ({why})")
        for name, reasons in self.kept.items():
            for reason, n in reasons.items():
                out.append(f"{name}: kept {n} dead unit{'s' if n > 1 else ''}: {reason}")
        out += [f"left as it is: {u}" for u in self.unsupported]
        return out or ["nothing to remove: no unit is dead (every unit has incoming and outgoing weights)"]


def _units(m: nn.Module) -> int:
    return m.weight.shape[0]


def _dead_in(m: nn.Module, j: int) -> bool:
    return not bool(m.weight[j].any())


def _constant(x: torch.Tensor) -> torch.Tensor | None:
    """The sample-independent value of ``x`` (samples along dim 0), or None if it varies."""
    ref = x[:1]
    tol = 1e-6 * float(ref.abs().max()) if ref.numel() else 0.0
    if float((x - ref).abs().max()) > tol:
        return None
    return x.mean(0).double()


def _fold(m: nn.Module, column: int, x: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(bias change of reader ``m`` for dropping input ``column``, '') or (None, why it cannot)."""
    if isinstance(m, graph.LINEAR):
        v = _constant(x[..., column].reshape(-1, 1))
        if v is None:
            return None, "its value varies from sample to sample"
        return m.weight[:, column].double() * v[0], ""
    v = _constant(x[:, column])
    if v is None:
        return None, "its value varies from sample to sample"
    w = m.weight[:, column:column + 1].double()
    out = m._conv_forward(v[None, None], w, None)[0].flatten(1)  # (out channels, positions)
    mean = out.mean(1)
    spread = float((out - mean[:, None]).abs().max()) if out.numel() else 0.0
    if spread > 1e-7 * max(1.0, float(out.abs().max())):
        pad = f"{m.padding_mode}-padded" if m.padding_mode != "zeros" else "zero-padded"
        return None, (f"constant channel (value {float(v.flatten()[0]):.4g}) feeding {pad} conv, whose border "
                      "outputs would change")
    return mean, ""


def _plan_group(model: nn.Module, g: graph.Group, inputs: dict[str, torch.Tensor],
                plan: _Plan, notes: _Notes) -> bool:
    """Add group ``g``'s removal to ``plan`` if it is exact; note why a dead group stays."""
    mods = {name: model.get_submodule(name) for name in {r.module for r in g.reads} | {p for p, _ in g.producers}}
    dead_in = all(_dead_in(mods[p], j) for p, j in g.producers)
    live_reads = [r for r in g.reads if bool(mods[r.module].weight[:, r.column].any())]
    if not dead_in and (live_reads or g.pins):
        return False  # a live unit: it varies with the input and something uses it
    if g.pins:
        for p, _ in g.producers:
            notes.kept[p][g.pins[0]] += 1
        return False
    deltas = []
    for r in live_reads:  # dead_in: fold the constant each reader sees
        delta, why = _fold(mods[r.module], r.column, inputs[r.module])
        if delta is None:
            for p, _ in g.producers:
                notes.kept[p][f"{why} ({r.module})"] += 1
            return False
        deltas.append((r.module, delta))
    for name, delta in deltas:
        prev = plan.bias_delta.get(name)
        plan.bias_delta[name] = delta if prev is None else prev + delta
    for p, j in g.producers:
        plan.remove_out[p].add(j)
        if not live_reads:
            kind = "dead: no outgoing weights"
        elif all(not bool(d.any()) for _, d in deltas):
            kind = "dead: constant 0 after BatchNorm/activation"
        else:
            kind = f"constant, folded into the bias of {', '.join(sorted({r.module for r in live_reads}))}"
        notes.removed[p][kind] += 1
    for r in g.reads:
        plan.remove_in[r.module].add(r.column)
    for name, k in g.norms:
        plan.remove_norm[name].add(k)
    return True


def _plan(model: nn.Module, t: graph.Trace, notes: _Notes) -> _Plan:
    removable = {id(g): g for g in t.groups if _plan_group(model, g, t.inputs, _Plan(), _Notes())}
    put_back = set()
    while True:  # every layer keeps one unit: put back a group of a layer that would lose all of them
        lost = Counter(p for g in removable.values() for p, _ in g.producers)
        empty = [p for p, n in lost.items() if n >= _units(model.get_submodule(p))]
        if not empty:
            break
        back = next(g for g in removable.values() if any(p == empty[0] for p, _ in g.producers))
        del removable[id(back)]
        put_back.add(id(back))
        for p, _ in back.producers:
            notes.kept[p]["the layer's last unit (a layer needs one output)"] += 1
    plan, scratch = _Plan(), _Notes()
    for g in t.groups:
        if id(g) in removable:
            _plan_group(model, g, t.inputs, plan, notes)
        elif id(g) not in put_back:
            _plan_group(model, g, t.inputs, _Plan(), scratch)  # records why dead units stay
    for name, reasons in scratch.kept.items():
        notes.kept[name].update(reasons)
    return plan


def _set(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(m, name)
    if isinstance(old, nn.Parameter) or name in m._parameters:
        grad = old.requires_grad if old is not None else True
        setattr(m, name, nn.Parameter(value.contiguous(), requires_grad=grad))
    else:
        setattr(m, name, value.contiguous())


def _keep(n: int, drop: set[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long, device=device)


@torch.no_grad()
def _apply(model: nn.Module, plan: _Plan) -> None:
    for name, delta in plan.bias_delta.items():  # on the full rows, before any of them go
        m = model.get_submodule(name)
        if m.bias is None:
            _set(m, "bias", torch.zeros(_units(m), dtype=m.weight.dtype, device=m.weight.device))
        m.bias.copy_((m.bias.double() + delta.to(m.bias.device)).to(m.bias.dtype))
    for name, drop in plan.remove_out.items():
        m = model.get_submodule(name)
        keep = _keep(_units(m), drop, m.weight.device)
        _set(m, "weight", m.weight[keep])
        if m.bias is not None:
            _set(m, "bias", m.bias[keep])
        setattr(m, "out_features" if isinstance(m, graph.LINEAR) else "out_channels", len(keep))
    for name, drop in plan.remove_in.items():
        m = model.get_submodule(name)
        keep = _keep(m.weight.shape[1], drop, m.weight.device)
        _set(m, "weight", m.weight[:, keep])
        setattr(m, "in_features" if isinstance(m, graph.LINEAR) else "in_channels", len(keep))
    for name, drop in plan.remove_norm.items():
        m = model.get_submodule(name)
        keep = _keep(m.num_features, drop, m.running_mean.device if m.running_mean is not None else "cpu")
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, attr) is not None:
                _set(m, attr, getattr(m, attr)[keep])
        m.num_features = len(keep)


def _perturbed(inputs: tuple, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if x.is_floating_point():
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
            x = x + noise * (x.std() if x.numel() > 1 else 1.0)
        out.append(x)
    return tuple(out)


@torch.no_grad()
def _check_same(original: nn.Module, small: nn.Module, inputs: tuple, atol: float) -> None:
    for args in (inputs, _perturbed(inputs)):
        ref, out = tree_leaves(original(*args)), tree_leaves(small(*args))
        for a, b in zip(ref, out):
            if not isinstance(a, torch.Tensor):
                continue
            if a.shape != b.shape:
                raise ExportError(f"shrink changed the output shape of {type(original).__name__} from "
                                  f"{list(a.shape)} to {list(b.shape)}: a bug in export; use the model unshrunk")
            diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
            if diff > atol * scale:
                raise ExportError(f"shrink changed the outputs of {type(original).__name__} by {diff:.3g} "
                                  f"(> atol {atol:g}·{scale:.3g}): a bug in export, or a model whose outputs "
                                  "amplify rounding (then pass a larger atol); use the model unshrunk")


def default_atol(model: nn.Module) -> float:
    """1e-5 for a float32/float64 model; four ulps at 1 of the lowest floating-point precision among
    its params and buffers otherwise (bf16: 0.031, fp16: 0.0039)."""
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    low = [torch.finfo(d).eps for d in dtypes if d not in (torch.float32, torch.float64)]
    return max([1e-5] + [4 * eps for eps in low])


def shrink(model: nn.Module, example_inputs: Any, *, atol: float | None = None) -> nn.Module:
    """A copy of ``model`` (eval mode) without its dead neurons/channels and with the same outputs.

    ``example_inputs``: a tensor or tuple of tensors, the arguments of ``model(...)`` (a small batch
    of the real input shape; its values do not matter). The copy's ``export_notes`` (a list of
    lines, shown by ``report``) say what was removed per layer and why dead units stayed.
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    if model.training:
        warnings.warn(TRAIN_MODE_NOTE, UserWarning, stacklevel=2)
    original = copy.deepcopy(model).eval()
    small = copy.deepcopy(original)
    notes = _Notes()
    notes.before = {n: _units(m) for n, m in small.named_modules() if isinstance(m, graph.LINEAR + graph.CONV)}
    with torch.no_grad():
        for _ in range(_MAX_ROUNDS):
            round_notes = _Notes()
            t = graph.trace(small, inputs)
            notes.unsupported = list(dict.fromkeys(t.unsupported))
            plan = _plan(small, t, round_notes)
            for name, c in round_notes.removed.items():
                notes.removed[name].update(c)
            notes.kept = round_notes.kept  # the last round's view of what stays
            if not plan.remove_out:
                break
            _apply(small, plan)
    _check_same(original, small, inputs, default_atol(model) if atol is None else atol)
    small.export_notes = ([TRAIN_MODE_NOTE] if model.training else []) + notes.lines()
    return small
