"""Channel dependencies of a model: which output units of which layers must go together, where each
is read, and what pins it in place. Traced with ``torch.fx`` and run once on example inputs.

Every tensor gets (at most) one tracked dimension, its *channel* dimension (dim 1 after a conv,
the last dim after a Linear), and per position along it a *slot*. A Linear/Conv creates one slot
per output unit. Ops that are per channel (activations, BatchNorm, pooling, dropout) pass the slots
on; flatten repeats them; ``cat`` along the channel dim concatenates them; ops that make two
positions one value — residual adds, products, ``cat`` along another dim — merge their slots
(union-find). A *group* is a set of merged slots: the units in it can only be removed together,
from every layer that produces, normalizes or reads them.

A slot is *pinned* (never removed) when something depends on its position or value in a way that
surgery on Linear/Conv/BatchNorm modules cannot follow: the model output, indexing by position, an
op or layer not listed here (the reason names it), a tensor that is not traced (the model input,
a parameter used per channel), a layer called more than once. Pinning is how the tracer stays
exact: anything unknown keeps its units.

The run also records what every Linear/Conv actually read (a copy of its input at the moment it
ran, so in-place ops upstream are seen as they were), which ``shrink`` uses for the values of
constant units.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import ExportError
from .graph_shapes import Chan as _Chan, ShapeRules, op_name as _name
from .sparse_linear import SparseLinear

__all__ = ["LINEAR", "CONV", "NORM", "Read", "Group", "Trace", "trace"]

LINEAR = (nn.Linear,)
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
                        nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d,
                        nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_PER_CHANNEL_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu,
                      F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.mish, F.sigmoid, F.tanh, torch.sigmoid,
                      torch.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clamp, torch.abs,
                      torch.neg, operator.neg, torch.exp}
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "contiguous", "clone", "detach",
                        "float", "double", "half", "bfloat16", "to", "abs", "neg", "exp"}
_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
               F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_BINARY_FUNCS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, operator.mul,
                 operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE_METHODS = {"sum", "mean", "amax", "amin"}
_REDUCE_FUNCS = {torch.sum, torch.mean, torch.amax, torch.amin}
_SIZE_METHODS = {"size", "dim"}


@dataclasses.dataclass(frozen=True)
class Read:
    module: str   # the Linear/Conv that reads the unit
    column: int   # its input feature / input channel


@dataclasses.dataclass
class Group:
    """Units that stand or fall together."""
    producers: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (Linear/Conv, output unit)
    reads: list[Read] = dataclasses.field(default_factory=list)
    norms: list[tuple[str, int]] = dataclasses.field(default_factory=list)      # (BatchNorm, channel)
    pins: list[str] = dataclasses.field(default_factory=list)                   # why it must stay


@dataclasses.dataclass
class Trace:
    groups: list[Group]
    inputs: dict[str, torch.Tensor]  # what each Linear/Conv read on the example inputs
    output: Any                      # the model's output on them
    unsupported: list[str]           # layers with weights that shrink leaves as they are, and why


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class _LeafTracer(fx.Tracer):
    """fx's tracer, with SparseLinear kept whole (its forward branches on the batch size)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SparseLinear) or super().is_leaf_module(m, qualname)


class _Tracer(ShapeRules, fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, calls: dict[str, int]):
        super().__init__(gm)
        self.calls = calls
        self.uf = _UnionFind()
        self.chan: dict[fx.Node, _Chan | None] = {}
        self.out_slots: dict[str, list[int]] = {}
        self.producers: list[tuple[int, str, int]] = []
        self.reads: list[tuple[int, Read]] = []
        self.norms: list[tuple[int, str, int]] = []
        self.pins: list[tuple[int, str]] = []
        self.inputs: dict[str, torch.Tensor] = {}
        self.unsupported: list[str] = []

    # -- bookkeeping --------------------------------------------------------------------------------
    def pin(self, chan: _Chan | None, reason: str) -> None:
        if chan is not None:
            self.pins.extend((s, reason) for s in chan.slots)

    def tracked(self, args: Iterable[Any]) -> list[_Chan]:
        out = []
        for a in args:
            if isinstance(a, fx.Node) and self.chan.get(a) is not None:
                out.append(self.chan[a])
            elif isinstance(a, (list, tuple)):
                out.extend(self.tracked(a))
            elif isinstance(a, dict):
                out.extend(self.tracked(a.values()))
        return out

    def pin_all(self, n: fx.Node, reason: str) -> None:
        for c in self.tracked((*n.args, *n.kwargs.values())):
            self.pin(c, reason)

    def produce(self, name: str, units: int, dim: int) -> _Chan:
        if name not in self.out_slots:
            self.out_slots[name] = self.uf.new(units)
            self.producers.extend((s, name, j) for j, s in enumerate(self.out_slots[name]))
        slots = self.out_slots[name]
        if self.calls[name] > 1:
            self.pins.extend((s, f"{name} is called {self.calls[name]} times") for s in slots)
        return _Chan(dim, slots)

    # -- the run ------------------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), LINEAR + CONV) and args:
            if isinstance(args[0], torch.Tensor):
                self.inputs[n.target] = args[0].detach().clone()
        result = getattr(self, n.op)(n.target, args, kwargs)
        self.chan[n] = self.propagate(n, args, kwargs, result)
        return result

    def arg_chan(self, n: fx.Node, i: int = 0, key: str | None = None) -> _Chan | None:
        a = n.args[i] if len(n.args) > i else n.kwargs.get(key) if key else None
        return self.chan.get(a) if isinstance(a, fx.Node) else None

    def propagate(self, n: fx.Node, args: tuple, kwargs: dict, result: Any) -> _Chan | None:
        if n.op in ("placeholder", "get_attr"):
            return None
        if n.op == "output":
            self.pin_all(n, "model output")
            return None
        if not isinstance(result, torch.Tensor):
            if n.op == "call_method" and n.target in _SIZE_METHODS or n.target is getattr or (
                    n.target is operator.getitem and not isinstance(args[0], torch.Tensor)):
                return None
            self.pin_all(n, f"{_name(n)} (returns a {type(result).__name__})")
            return None
        if n.op == "call_module":
            return self.module_op(n, self.module.get_submodule(n.target), args, result)
        fn = n.target
        x = args[0] if args else None
        c = self.arg_chan(n, 0, "input")
        is_method = n.op == "call_method"
        if (fn in _PER_CHANNEL_FUNCS or is_method and fn in _PER_CHANNEL_METHODS) and \
                not any(isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values())):
            return c
        if fn in _POOL_FUNCS:
            return self.pool(n, c, x)
        if fn in _BINARY_FUNCS or is_method and fn in _BINARY_METHODS:
            return self.binary(n, args, result)
        if fn in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(n, args, kwargs, result)
        if fn is operator.getitem:
            return self.getitem(n, x, args[1], c)
        if fn is torch.flatten or is_method and fn == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self.flatten(n, c, x, start, end)
        if fn is torch.reshape or is_method and fn in ("reshape", "view"):
            return self.reshape(n, c, x, result)
        if fn in (torch.unsqueeze, torch.squeeze) or is_method and fn in ("unsqueeze", "squeeze"):
            return self.reshape(n, c, x, result, literal_ok=True)
        if fn in (torch.permute, torch.transpose) or is_method and fn in ("permute", "transpose", "t"):
            return self.permute(n, c, x, result, args[1:], kwargs)
        if fn in _REDUCE_FUNCS or is_method and fn in _REDUCE_METHODS:
            return self.reduce(n, c, x, args[1] if len(args) > 1 else kwargs.get("dim"),
                               args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        self.pin_all(n, f"{_name(n)} is not supported by shrink")
        return None

    # -- modules ------------------------------------------------------------------------------------
    def module_op(self, n: fx.Node, m: nn.Module, args: tuple, result: torch.Tensor) -> _Chan | None:
        name, c = n.target, self.arg_chan(n)
        x = args[0] if args else None
        if isinstance(m, LINEAR + CONV):
            conv = isinstance(m, CONV)
            if conv and m.groups != 1:
                self.pin_all(n, f"{name} is a grouped conv (groups={m.groups}), not supported by shrink")
                return None
            if c is not None:
                want = 1 if conv else x.dim() - 1
                if self.calls[name] > 1:
                    self.pin(c, f"read by {name}, which is called {self.calls[name]} times")
                elif c.dim != want:
                    self.pin(c, f"{name} reads them along another dimension")
                else:
                    self.reads.extend((s, Read(name, k)) for k, s in enumerate(c.slots))
            return self.produce(name, result.shape[1] if conv else result.shape[-1], 1 if conv else result.dim() - 1)
        if isinstance(m, NORM):
            if c is None:
                return None
            if c.dim != 1 or self.calls[name] > 1:
                self.pin(c, f"{name} ({type(m).__name__}) normalizes them along another dimension or is shared")
                return None
            self.norms.extend((s, name, k) for k, s in enumerate(c.slots))
            return c
        if isinstance(m, _PER_CHANNEL_MODULES) and len(args) == 1:
            return c
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            return c
        if isinstance(m, _POOL_MODULES):
            return self.pool(n, c, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(n, c, x, m.start_dim, m.end_dim)
        hint = " (shrink the dense model, then to_sparse)" if isinstance(m, SparseLinear) else ""
        reason = f"{name} ({type(m).__name__}) is not supported by shrink{hint}"
        self.pin_all(n, reason)
        if isinstance(m, SparseLinear) or any(True for _ in m.parameters()):  # a layer left as it is
            self.unsupported.append(reason)
        return None

    # -- functions ----------------------------------------------------------------------------------
    def pool(self, n: fx.Node, c: _Chan | None, x: torch.Tensor) -> _Chan | None:
        if c is not None and (c.dim != 1 or x.dim() < 3):
            self.pin(c, f"{_name(n)} pools along their dimension")
            return None
        return c

    def binary(self, n: fx.Node, args: tuple, result: torch.Tensor) -> _Chan | None:
        out_dim, first = None, None
        chans = []
        for a, v in zip(n.args[:2], args[:2]):
            c = self.chan.get(a) if isinstance(a, fx.Node) else None
            if c is not None:
                chans.append((c, c.dim + result.dim() - v.dim(), v))
        if not chans:
            return None
        dims = {d for _, d, _ in chans}
        if len(dims) > 1 or any(v.shape[c.dim] != result.shape[d] for c, d, v in chans):
            for c, _, _ in chans:
                self.pin(c, f"{_name(n)} combines them across dimensions (broadcast)")
            return None
        out_dim = dims.pop()
        first = chans[0][0]
        for c, _, _ in chans[1:]:
            for s, t in zip(first.slots, c.slots):
                self.uf.union(s, t)
        for a, v in zip(n.args[:2], args[:2]):  # a tensor shrink does not follow, varying along the channels
            untracked = isinstance(v, torch.Tensor) and not (isinstance(a, fx.Node) and self.chan.get(a) is not None)
            if untracked and v.dim() > 0:
                d = out_dim - (result.dim() - v.dim())
                if d >= 0 and v.shape[d] != 1:
                    what = f"parameter {a.target}" if isinstance(a, fx.Node) and a.op == "get_attr" else "a tensor"
                    self.pin(first, f"{_name(n)} with {what} that shrink does not follow")
        return _Chan(out_dim, first.slots)

    def cat(self, n: fx.Node, args: tuple, kwargs: dict, result: torch.Tensor) -> _Chan | None:
        nodes, values = n.args[0], args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        dim %= result.dim()
        chans = [self.chan.get(a) if isinstance(a, fx.Node) else None for a in nodes]
        if all(c is None for c in chans):
            return None
        if any(c is not None and c.dim != dim for c in chans):  # positions side by side: one value each
            tracked = [c for c in chans if c is not None]
            if any(c.dim != tracked[0].dim for c in tracked) or any(c is None for c in chans):
                for c in tracked:
                    self.pin(c, f"{_name(n)} joins them with tensors shrink does not follow")
                return None
            for c in tracked[1:]:
                for s, t in zip(tracked[0].slots, c.slots):
                    self.uf.union(s, t)
            return _Chan(tracked[0].dim, tracked[0].slots)
        slots: list[int] = []
        for c, v in zip(chans, values):
            if c is None:  # an untracked part: slots of its own, pinned
                fresh = _Chan(dim, self.uf.new(v.shape[dim]))
                self.pin(fresh, f"{_name(n)} with a tensor shrink does not follow")
                c = fresh
            slots.extend(c.slots)
        return _Chan(dim, slots)

def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def trace(model: nn.Module, example_inputs: tuple) -> Trace:
    """Trace ``model`` (in eval mode) and run it on ``example_inputs``; return its unit groups."""
    try:
        gm = fx.GraphModule(model, _LeafTracer().trace(model))
    except Exception as e:  # data-dependent control flow, unsupported Python in forward, ...
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"shrink cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {msg}); "
            "shrink needs a model whose forward torch.fx can trace. to_sparse, save_sparse and report "
            "work on any model.") from e
    tracer = _Tracer(gm, _call_counts(gm))
    with torch.no_grad():
        output = tracer.run(*example_inputs)
    groups: dict[int, Group] = {}

    def group(slot: int) -> Group:
        return groups.setdefault(tracer.uf.find(slot), Group())

    for s, name, j in tracer.producers:
        group(s).producers.append((name, j))
    for s, read in tracer.reads:
        group(s).reads.append(read)
    for s, name, k in tracer.norms:
        group(s).norms.append((name, k))
    for s, reason in tracer.pins:
        g = group(s)
        if reason not in g.pins:
            g.pins.append(reason)
    return Trace([g for g in groups.values() if g.producers], tracer.inputs, output, tracer.unsupported)
