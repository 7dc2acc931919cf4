"""Buckets: a group's params split by (device, dtype), each with the backend that updates it and
its cached state lists. [note: step overhead] Rebuilding the lists costs ~µs per tensor in
Python, which is a measurable share of a fused step on a CPU (and most of it for thousands of
small tensors), so a group's buckets are kept while the set of params with grads, the requested
backend, the regularizer type, the capturable flag and the states the kind needs stay the same.
"""
from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from typing import Any

import torch

from .. import distributed as dist_utils
from ..backends import Backend, select


@dataclasses.dataclass
class Bucket:
    """Params of one group that share a device and dtype: one backend call per step."""

    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor]
    backend: Backend
    moments: str = "fp32"  # the format of the bucket's moments (backends/moments.py)
    lists: dict[str, list[torch.Tensor]] | None = None  # state tensors, filled at the first step
    sharded: bool = False  # DTensor params: backends get the local shards of params and grads
    counts: torch.Tensor | None = None  # where the backends' counts are copied (CountsBuffers)

    @property
    def key(self) -> tuple:
        """(device, dtype), and the moments format when it is a compact one: a group with 8-bit
        moments has an fp32 bucket for its small params beside the 8-bit one."""
        return (self.device, self.dtype) if self.moments == "fp32" else (self.device, self.dtype, self.moments)


class Plans:
    """The cached buckets of every group, by group index."""

    def __init__(self):
        self._plans: dict[int, tuple[tuple, list[torch.Tensor], list[Bucket]]] = {}
        # since start_step(): whether any group's buckets were rebuilt, and the params a rebuild put in
        # a group's buckets that were not in them (re-checked one by one, checks.check_params)
        self.rebuilt = False
        self.added: list[torch.Tensor] = []

    def start_step(self) -> None:
        self.rebuilt = False
        self.added = []  # a new list: clear() would read its length, which torch.compile then guards on

    def clear(self) -> None:
        self._plans.clear()

    def drop_lists(self) -> None:
        """Forget every bucket's cached state lists (rebuilt from opt.state at the next step)."""
        for _, _, buckets in self._plans.values():
            for bucket in buckets:
                bucket.lists = None

    def backend_names(self, group_index: int) -> dict[tuple, str]:
        """{bucket key: name of the backend} of the group's latest buckets ({} before its first
        step): (device, dtype), with the moments format appended for compact moments
        (``Bucket.key``). The names come from the ``Backend`` records that ``select`` returned."""
        cached = self._plans.get(group_index)
        return {} if cached is None else {bucket.key: bucket.backend.name for bucket in cached[2]}

    def buckets(self, group_index: int, group: dict[str, Any], params: list[torch.Tensor], backend: str,
                state_signature: tuple, moments_format=lambda p: "fp32") -> list[Bucket]:
        """The group's buckets: its params with grads split by (device, dtype, moments format)."""
        signature = (backend, type(group["reg"]), group["capturable"], state_signature)
        cached = self._plans.get(group_index)
        if (cached is not None and cached[0] == signature and len(cached[1]) == len(params)
                and all(map(operator.is_, cached[1], params)) and not _format_changed(cached[2], moments_format)):
            return cached[2]
        before = set(map(id, cached[1])) if cached is not None and cached[0] == signature else set()
        self.added.extend(p for p in params if id(p) not in before)
        self.rebuilt = True
        by_key: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_key[(p.device, p.dtype, moments_format(p))].append(p)
        buckets = [Bucket(device, dtype, members, select(backend, device, group["reg"], fmt), moments=fmt,
                          sharded=any(map(dist_utils.is_dtensor, members)))
                   for (device, dtype, fmt), members in by_key.items()]
        self._plans[group_index] = (signature, params, buckets)
        return buckets


def _format_changed(buckets: list[Bucket], moments_format) -> bool:
    """Whether a param of an 8-bit bucket no longer stores 8 bits (e.g. made channels_last by
    ``model.to(memory_format=...)``): its moments then go back to fp32 (moments.storage). Only
    8-bit buckets are looked at, so fp32 and bf16 groups pay nothing per step."""
    return any(moments_format(p) != bucket.moments for bucket in buckets if bucket.moments == "8bit"
               for p in bucket.params)


class CountsBuffers:
    """Where the latest non-zero counts of each bucket live, for ``density()``.

    [note: counts buffer] A captured step copies its counts into the bucket's buffer at every
    replay, and an eager step between replays writes the same buffer, so density() always sees the
    step that ran last. In a capturable group the buffer is kept for the optimizer's lifetime per
    (group, device, dtype, params): a graph writes its address at every replay, so it must never
    be freed, and buckets rebuilt for the same params (another backend, capturable switched, a
    param without grad for a while) find it again. A bucket's first step, which makes the buffer,
    is never captured (checks refuse it)."""

    def __init__(self):
        # latest counts: {(group index, bucket key): (params, counts)}
        self.latest: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
        # capturable groups: one buffer per (group index, bucket key, param ids), kept for good
        self._kept: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def clear_latest(self) -> None:
        self.latest.clear()

    def record(self, group_index: int, capturable: bool, bucket: Bucket, counts: torch.Tensor) -> None:
        if bucket.counts is None:
            bucket.counts = self._buffer(group_index, capturable, bucket, counts)
        else:
            bucket.counts.copy_(counts)
        key = (group_index, bucket.key)
        # re-inserted, not updated in place: nonzeros() lets the latest entry win for a param, and a
        # param can move between keys (a group's moments format or LinBreg's momentum changed)
        self.latest.pop(key, None)
        self.latest[key] = (bucket.params, bucket.counts)

    def _buffer(self, group_index: int, capturable: bool, bucket: Bucket, counts: torch.Tensor) -> torch.Tensor:
        if not capturable:  # never written by a graph: the bucket's own copy will do
            return counts.clone()
        key = (group_index, bucket.key, tuple(map(id, bucket.params)))  # the params are kept: ids stay unique
        entry = self._kept.get(key)
        if entry is None:
            entry = self._kept[key] = (bucket.params, counts.clone())
        else:
            entry[1].copy_(counts)
        return entry[1]

    def nonzeros(self) -> dict[torch.Tensor, torch.Tensor]:
        """The latest count of every param stepped so far."""
        latest: dict[torch.Tensor, torch.Tensor] = {}
        for params, counts in self.latest.values():
            for p, c in zip(params, counts):
                latest[p] = c
        return latest
