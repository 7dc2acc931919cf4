"""``save_sparse``/``load_sparse``: checkpoints whose size follows the non-zeros, restored bit for bit.

Each tensor of the state dict is stored in the smallest of three encodings (flattened to rows =
dim 0, columns = the rest):

``dense``    all values;
``rows``     the non-zero values, their column indices (int16 when there are < 32768 columns, else
             int32) and a non-zero count per row (int16/int32 likewise): 2 bytes per non-zero + 2
             per row for every layer of the paper's models;
``bitmask``  the non-zero values and one bit per entry: smaller than ``rows`` above ~6 % density
             (fp32, int16 indices).

Every value comes back bit for bit, the sign of a zero included: weights trained elsewhere (or by
bregman_fused before it wrote its shrink as v − clamp(v), which gives +0.0) may hold −0.0 for about
half of their zeros, so a tensor with any −0.0 also
stores one sign bit per zero (``neg_zeros``, packed with the bitmasks): numel/8 bytes at most,
where storing the −0.0s as values would cost as much as the non-zeros. The values
of one dtype, the indices, the counts and the bitmasks are each packed into one flat tensor: a
torch.save file spends ~100 bytes or more on each tensor record, which would dominate the small
models. A naive CSR ``torch.save`` (int64 indices) of the digits MLP at 3.5 % density was only 4.3×
smaller than the dense checkpoint (issue 16). The file holds only tensors, numbers, strings and
lists, so ``torch.load(path, weights_only=True)`` reads it.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ExportError

__all__ = ["FORMAT", "save_sparse", "load_sparse", "resize_like", "encoded_bytes"]

FORMAT = "bregman_fused.export.sparse/1"


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ExportError(f"unknown dtype {name!r} in a sparse checkpoint")
    return dt


def _nonzero(flat: torch.Tensor) -> torch.Tensor:
    """Non-zero mask (NaN counts as non-zero; −0.0 as zero, see the module doc)."""
    return flat != 0


def _index_dtype(cols: int) -> torch.dtype:
    """Holds column indices < cols and per-row counts <= cols."""
    return torch.int16 if cols <= 32767 else torch.int32


def _negative_zeros(flat: torch.Tensor) -> torch.Tensor:
    """Where ``flat`` holds −0.0 (never for integer tensors)."""
    if not flat.is_floating_point():
        return torch.zeros_like(flat, dtype=torch.bool)
    return (flat == 0) & torch.signbit(flat)


def _plan(t: torch.Tensor, nnz: int, signed_zeros: bool = False) -> tuple[str, int]:
    """(encoding, bytes) of the smallest encoding of ``t`` with ``nnz`` non-zeros."""
    esize, numel = t.element_size(), t.numel()
    sizes = {"dense": numel * esize}
    if t.dim() >= 1 and numel:
        rows = t.shape[0]
        cols = numel // rows
        isize = _index_dtype(cols).itemsize
        sizes["rows"] = nnz * (esize + isize) + rows * isize
        sizes["bitmask"] = nnz * esize + math.ceil(numel / 8)
        if signed_zeros:  # one sign bit per zero besides the values
            for k in ("rows", "bitmask"):
                sizes[k] += math.ceil((numel - nnz) / 8)
    enc = min(sizes, key=lambda k: (sizes[k], k != "dense"))
    return enc, sizes[enc]


def encoded_bytes(t: torch.Tensor) -> int:
    """Bytes ``save_sparse`` spends on the data of ``t`` (without the file's fixed overhead)."""
    flat = t.detach().reshape(-1).contiguous()
    return _plan(t, int(_nonzero(flat).sum()), bool(_negative_zeros(flat).any()))[1]


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    pad = (-mask.numel()) % 8
    bits = torch.cat([mask, mask.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n].bool()


def _state_of(obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise ExportError(f"save_sparse needs a model (nn.Module) or a state dict, got {type(obj).__name__}")


def save_sparse(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                meta: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Write ``model``'s state dict (or a state dict) to ``path`` with only its non-zeros.

    CSR weights (``to_sparse`` models) are stored like dense ones, so the file loads into the dense
    model as well. ``meta``: plain data (numbers, strings, lists, dicts) stored alongside.
    Returns {"bytes": file size, "dense_bytes": the values of all tensors, "nnz", "numel"}.
    """
    state = _state_of(model)
    entries, values, index, masks = [], {}, {torch.int16: [], torch.int32: []}, []
    offsets = {"index": {torch.int16: 0, torch.int32: 0}, "mask": 0}
    stats = {"dense_bytes": 0, "nnz": 0, "numel": 0}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"save_sparse: state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.contiguous()
        flat = t.reshape(-1)
        mask = _nonzero(flat)
        nnz = int(mask.sum())
        negative_zeros = _negative_zeros(flat)
        signed_zeros = bool(negative_zeros.any())
        enc, _ = _plan(t, nnz, signed_zeros)
        key = str(t.dtype)
        vals = values.setdefault(key, [])
        start = sum(v.numel() for v in vals)
        e = {"name": name, "shape": list(t.shape), "dtype": key, "encoding": enc, "values": start}
        if enc == "dense":
            vals.append(flat)
        else:
            vals.append(flat[mask])
            e["nnz"] = nnz
        if enc == "rows":
            cols = t.numel() // t.shape[0]
            idt = _index_dtype(cols)
            where = mask.view(t.shape[0], cols)
            e["index_dtype"], e["index"] = str(idt), offsets["index"][idt]
            index[idt] += [where.sum(1).to(idt), where.nonzero()[:, 1].to(idt)]
            offsets["index"][idt] += t.shape[0] + nnz
        elif enc == "bitmask":
            packed = _pack_bits(mask)
            e["mask"] = offsets["mask"]
            masks.append(packed)
            offsets["mask"] += packed.numel()
        if enc != "dense" and signed_zeros:  # the sign of each zero, in the order of the zeros
            packed = _pack_bits(negative_zeros[~mask])
            e["neg_zeros"] = offsets["mask"]
            masks.append(packed)
            offsets["mask"] += packed.numel()
        entries.append(e)
        stats["dense_bytes"] += t.numel() * t.element_size()
        stats["nnz"] += nnz
        stats["numel"] += t.numel()
    blob = {
        "format": FORMAT, "meta": dict(meta or {}), "entries": entries,
        "values": {k: torch.cat(v) if v else torch.empty(0) for k, v in values.items()},
        "index": {str(k): torch.cat(v) if v else torch.empty(0, dtype=k) for k, v in index.items()},
        "mask": torch.cat(masks) if masks else torch.empty(0, dtype=torch.uint8),
    }
    path = os.fspath(path)
    tmp = path + ".part"
    torch.save(blob, tmp)
    os.replace(tmp, path)
    stats["bytes"] = os.path.getsize(path)
    return stats


def _decode(e: dict[str, Any], blob: dict[str, Any]) -> torch.Tensor:
    dtype, shape = _dtype(e["dtype"]), e["shape"]
    numel = math.prod(shape)
    vals = blob["values"][e["dtype"]]
    if e["encoding"] == "dense":
        return vals[e["values"]:e["values"] + numel].clone().view(shape)
    nnz = e["nnz"]
    nz = vals[e["values"]:e["values"] + nnz]
    out = torch.zeros(numel, dtype=dtype)
    if e["encoding"] == "rows":
        rows = shape[0]
        cols = numel // rows
        idx = blob["index"][e["index_dtype"]][e["index"]:e["index"] + rows + nnz].long()
        counts, columns = idx[:rows], idx[rows:]
        row_of = torch.repeat_interleave(torch.arange(rows), counts)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[row_of * cols + columns] = True
    elif e["encoding"] == "bitmask":
        nbytes = math.ceil(numel / 8)
        mask = _unpack_bits(blob["mask"][e["mask"]:e["mask"] + nbytes], numel)
    else:
        raise ExportError(f"unknown encoding {e['encoding']!r} of {e['name']!r} in a sparse checkpoint")
    out[mask] = nz
    if "neg_zeros" in e:
        zeros = (~mask).nonzero().view(-1)
        start = e["neg_zeros"]
        negative = _unpack_bits(blob["mask"][start:start + math.ceil(zeros.numel() / 8)], zeros.numel())
        out[zeros[negative]] = -0.0
    return out.view(shape)


def load_sparse(path: str | os.PathLike, *, with_meta: bool = False):
    """The dense state dict saved by ``save_sparse`` (bit-exact), for ``model.load_state_dict``;
    with ``with_meta=True``, ``(state, meta)``. Reads with ``torch.load(weights_only=True)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"no sparse checkpoint at {path!r}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path!r} is not a readable sparse checkpoint ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ExportError(f"{path!r} is not a {FORMAT} file (written by export.save_sparse); for a training "
                          "checkpoint use python -m bregman_fused.export CHECKPOINT --out DIR")
    state = OrderedDict((e["name"], _decode(e, blob)) for e in blob["entries"])
    return (state, blob["meta"]) if with_meta else state


@torch.no_grad()
def resize_like(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Resize ``model``'s Linear/Conv/BatchNorm layers (in place) to the shapes in ``state`` — a
    shrunk model's state dict — so that ``model.load_state_dict(state)`` fits. Returns ``model``."""
    from .graph import CONV, LINEAR, NORM

    for name, m in model.named_modules():
        w = state.get(f"{name}.weight" if name else "weight")
        if isinstance(m, LINEAR + CONV) and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            m.weight = nn.Parameter(m.weight.new_empty(w.shape), requires_grad=m.weight.requires_grad)
            if m.bias is None and f"{name}.bias" in state:
                m.bias = nn.Parameter(m.weight.new_empty(w.shape[0]))
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.new_empty(w.shape[0]), requires_grad=m.bias.requires_grad)
            if isinstance(m, LINEAR):
                m.out_features, m.in_features = w.shape[0], w.shape[1]
            else:
                m.out_channels, m.in_channels = w.shape[0], w.shape[1]
        elif isinstance(m, NORM):
            # its size from the running statistics, or from the affine weight of one that keeps none
            # (track_running_stats=False)
            sized = state.get(f"{name}.running_mean", w)
            if sized is not None and sized.dim() == 1 and sized.shape[0] != m.num_features:
                n = sized.shape[0]
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    old = getattr(m, attr)
                    if old is not None:
                        new = old.new_empty(n)
                        setattr(m, attr, nn.Parameter(new) if isinstance(old, nn.Parameter) else new)
                m.num_features = n
    return model
