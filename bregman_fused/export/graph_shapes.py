"""How ops that move dimensions carry a tensor's channel dimension (see ``graph``): indexing,
flatten, reshape/view/unsqueeze/squeeze, permute/transpose, reductions.

Each rule returns the output's ``Chan`` (or None when the output has no tracked dimension) and pins
what it cannot follow: an index that picks a channel by position (positions before it must not
move), a reshape to a size written into the model (``x.view(-1, 1024)`` breaks once channels go),
a reduction over the channels, a flatten into the batch dimension.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Chan", "ShapeRules", "op_name"]


@dataclasses.dataclass
class Chan:
    dim: int           # non-negative index of the tracked dimension
    slots: list[int]   # one slot per position along it


def op_name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class ShapeRules:
    """Mixed into the tracer, which provides ``pin(chan, reason)``."""

    def getitem(self, n: fx.Node, x: torch.Tensor, index: Any, c: Chan | None) -> Chan | None:
        if c is None:
            return None
        items = index if isinstance(index, tuple) else (index,)
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            self.pin(c, "indexed by a tensor")
            return None
        i = o = 0
        for item in items:
            if item is None:
                o += 1
                continue
            if item is Ellipsis:
                covered = x.dim() - sum(1 for j in items if j is not None and j is not Ellipsis)
                if i <= c.dim < i + covered:
                    return Chan(o + c.dim - i, c.slots)
                i, o = i + covered, o + covered
                continue
            if i == c.dim:
                if isinstance(item, int):  # one channel selected by position: that position must not move
                    n_pos = len(c.slots)
                    keep = c.slots[item % n_pos:] if item < 0 else c.slots[:item + 1]
                    self.pin(Chan(c.dim, keep), "selected by position (indexing)")
                    return None
                if item != slice(None):
                    self.pin(c, "sliced by position")
                    return Chan(o, c.slots[item])
                return Chan(o, c.slots)  # items after the channel dim do not move it
            i += 1
            o += 0 if isinstance(item, int) else 1
        return Chan(o + c.dim - i, c.slots)

    def flatten(self, n: fx.Node, c: Chan | None, x: torch.Tensor, start: int, end: int) -> Chan | None:
        if c is None:
            return None
        start, end = start % x.dim(), end % x.dim()
        if c.dim < start:
            return c
        if c.dim > end:
            return Chan(c.dim - (end - start), c.slots)
        if start == 0:
            self.pin(c, f"{op_name(n)} merges them with the batch dimension")
            return None
        block = list(x.shape[start:end + 1])
        view = [-1 if j == c.dim - start else 1 for j in range(len(block))]
        coord = torch.arange(x.shape[c.dim]).view(view).expand(block).reshape(-1).tolist()
        return Chan(start, [c.slots[k] for k in coord])

    def reshape(self, n: fx.Node, c: Chan | None, x: torch.Tensor, result: torch.Tensor,
                literal_ok: bool = False) -> Chan | None:
        if c is None:
            return None
        src, dst = list(x.shape), list(result.shape)
        if src == dst:
            return c
        # a reshape that only adds or drops size-1 dims: the channel dim keeps its rank among the others
        if [s for s in src if s != 1] == [s for s in dst if s != 1] and src[c.dim] != 1:
            rank = sum(1 for s in src[:c.dim] if s != 1)
            out = [j for j, s in enumerate(dst) if s != 1][rank]
            return Chan(out, c.slots) if literal_ok or not self._literal_at(n, out) else self._fixed(c, n)
        # a reshape that merges a run of dims: a flatten
        p = 0
        while p < min(len(src), len(dst)) and src[p] == dst[p]:
            p += 1
        q = 0
        while q < min(len(src), len(dst)) - p and src[-1 - q] == dst[-1 - q]:
            q += 1
        if len(dst) == p + q + 1 and len(src) > p + q and math.prod(src[p:len(src) - q]) == dst[p]:
            out = self.flatten(n, c, x, p, len(src) - q - 1)
            if out is not None and not literal_ok and self._literal_at(n, out.dim):
                return self._fixed(out, n)
            return out
        self.pin(c, f"{op_name(n)} reshapes them in a way shrink does not follow")
        return None

    def _fixed(self, c: Chan, n: fx.Node) -> Chan:
        self.pin(c, f"{op_name(n)} to a fixed size")
        return c

    @staticmethod
    def _literal_at(n: fx.Node, dim: int) -> bool:
        """Whether the target shape gives the channel dim as a number written into the model."""
        shape = n.args[1:] if len(n.args) > 1 else n.kwargs.get("shape", ())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        return dim < len(shape) and isinstance(shape[dim], int) and shape[dim] != -1

    def permute(self, n: fx.Node, c: Chan | None, x: torch.Tensor, result: torch.Tensor, rest: tuple,
                kwargs: dict) -> Chan | None:
        if c is None:
            return None
        if n.target == "t":
            order = [1, 0] if x.dim() == 2 else [0]
        elif n.target in ("transpose", torch.transpose):
            a, b = (d % x.dim() for d in rest[:2])
            order = list(range(x.dim()))
            order[a], order[b] = order[b], order[a]
        else:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or kwargs.get("dims")
            order = [d % x.dim() for d in dims]
        return Chan(order.index(c.dim), c.slots)

    def reduce(self, n: fx.Node, c: Chan | None, x: torch.Tensor, dim: Any, keepdim: bool) -> Chan | None:
        if c is None:
            return None
        if dim is None:
            self.pin(c, f"{op_name(n)} over all dimensions")
            return None
        dims = {d % x.dim() for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        if c.dim in dims:
            self.pin(c, f"{op_name(n)} over them")
            return None
        return c if keepdim else Chan(c.dim - sum(1 for d in dims if d < c.dim), c.slots)
