"""Every validation of the optimizer classes, in one place.

Values are checked when they are set (constructor, ``add_param_group``) and again at every step,
since a group's keys can be edited between steps; ``check_plan`` runs for every group before any
tensor is written, so a refused step changes nothing. No check here reads a device tensor (a step
must not sync).
"""
from __future__ import annotations

import difflib
import math
import operator
import warnings
from typing import Any

import torch

from .. import backends
from .. import distributed as dist_utils
from ..backends import moments
from . import moment_states
from ..backends.contract import state_dtype
from ..regularizers import Regularizer


def finite(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (must be a number)") from None
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    return value


def in_unit_interval(name: str, value: Any) -> None:
    if not 0.0 <= finite(name, value) < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def check_lr_value(lr: Any) -> None:
    if finite("lr", lr) < 0.0:
        raise ValueError(f"Invalid lr: {float(lr)} (must be >= 0)")


# group keys torch.optim and its lr schedulers add; anything else a user adds (e.g. "name") is theirs
_TORCH_GROUP_KEYS = ("params", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "base_lr",
                     "foreach", "fused", "differentiable", "maximize")
# keys users reach for when they mean `reg`; each answered with what to write instead
_MEANT = {"lamda": "reg=bf.L1(lamda=...)", "lambda": "reg=bf.L1(lamda=...)", "lamda_l1": "reg=bf.SparseGroupL1L2(...)",
          "regs": "reg", "regularizer": "reg", "regularization": "reg", "penalty": "reg"}


def check_group_keys(owner: str, group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Warn about a key that looks like a misspelt option: it would be silently ignored (e.g.
    "lamda" in a group leaves the group unregularized). Keys that resemble nothing stay silent."""
    known = set(defaults) | set(_TORCH_GROUP_KEYS)
    for key in group:
        if key in known or not isinstance(key, str):
            continue
        meant = _MEANT.get(key.lower()) or next(iter(difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)),
                                                None)
        if meant is not None:
            warnings.warn(f"{owner}: param group key {key!r} is not an option of {owner} and is ignored; did you mean "
                          f"{meant!r}? (options: {', '.join(sorted(defaults))})", UserWarning, stacklevel=4)


def check_new_group(owner: str, group: dict[str, Any]) -> None:
    """What ``add_param_group`` checks once, on top of ``check_group``: the params themselves."""
    params = group["params"]
    if len(params) == 0:
        raise ValueError(f"{owner}: a param group has no parameters (an iterator that was already used up, e.g. "
                         "model.parameters() passed twice? pass a list)")
    if len({id(p) for p in params}) != len(params):
        # torch only warns; a fused kernel would update the tensor twice, from two threads
        raise ValueError(f"{owner}: a param group lists the same parameter twice")
    for p in params:
        if p.is_complex():
            raise ValueError(f"{owner} does not support complex parameters (got {p.dtype})")
        if not p.is_floating_point():
            raise ValueError(f"{owner} needs floating-point parameters (got {p.dtype})")
        group["reg"].check_param(p)
        dist_utils.check_sharding(p, group["reg"])
    check_lr_value(group["lr"])  # a device lr too: adding a group may sync


def check_moments(group: dict[str, Any]) -> None:
    """The ``moments`` option (backends/moments.py): a known format, and compact formats only for
    float32/bf16/fp16 params (a float64 param's states are float64 for its precision; rounding its
    moments to 8 or 16 bits would defeat that)."""
    fmt = moments.check_moments(group["moments"])
    if fmt != "fp32":
        for p in group["params"]:
            if p.dtype == torch.float64:
                raise ValueError(f"moments={fmt!r} is for float32/bf16/fp16 params; this group has a float64 param "
                                 f"{list(p.shape)} (its states are float64): use moments='fp32' for it, e.g. in a "
                                 "param group of its own")


def check_group(group: dict[str, Any], has_dual: bool) -> None:
    """The keys every optimizer's groups share, checked at every step. A tensor lr's value is
    checked when it is set (``check_new_group``, ``load_state_dict``) and, in eager steps, when it
    lives on the CPU (a cheap read); never on a GPU (a sync) or under torch.compile (a graph break,
    and a recompile per value)."""
    if not isinstance(group["capturable"], bool):
        raise TypeError(f"Invalid capturable: {group['capturable']!r} (must be True or False)")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid lr: a tensor lr must hold one float32/float64 value, got {lr.dtype} "
                             f"with {lr.numel()} elements")
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            check_lr_value(lr)
    else:
        check_lr_value(lr)
    reg = group["reg"]
    if not isinstance(reg, Regularizer):
        raise TypeError(f"Invalid reg: {reg!r} (must be a bregman_fused regularizer, e.g. bf.L1(lamda=1e-3))")
    for key, value in reg._params().items():
        if finite(key, value) < 0.0:
            raise ValueError(f"Invalid {key}: {value} (must be >= 0)")
    if has_dual and not finite("delta", group["delta"]) > 0.0:
        raise ValueError(f"Invalid delta: {group['delta']} (must be > 0)")


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    in_unit_interval("beta1 (betas[0])", betas[0])
    in_unit_interval("beta2 (betas[1])", betas[1])


def check_sparse_grads(owner: str, params: list[torch.Tensor]) -> None:
    # torch's .grad setter already rejects grads of another device, dtype or shape
    if any(p.grad.layout != torch.strided for p in params):  # sparse COO/CSR/... grads
        raise RuntimeError(f"{owner} does not support sparse gradients")


def check_states(owner: str, group_index: int, params: list[torch.Tensor], state, allowed: set[str],
                 needed: set[str], moment_keys: tuple[str, ...] = ()) -> None:
    """The states a bucket's lists are (re)built from, as the user may have edited them: a state
    that exists holds every key its optimizer needs, each a tensor of its param's shape, state
    dtype and device; moments (``moment_keys``) in any format with their scales, on the device
    (they are converted to the group's format next). Missing states are made later."""
    for i, p in enumerate(params):
        s = state.get(p)
        if not s:
            continue
        lacking = sorted(needed - set(s))
        if lacking:
            raise ValueError(f"{owner}: the state of param {i} of param group {group_index} lacks {lacking} (it has "
                             f"{sorted(s)}); restore them, or clear the whole state (opt.state[p].clear()) to restart "
                             "it at the next step")
        for key in sorted(allowed & set(s)):
            value = s[key]
            if key.endswith(moment_states.SCALE_SUFFIX):
                continue  # checked with its moment
            if key in moment_keys:
                problem = moment_states.check_stored(key, value, s.get(key + moment_states.SCALE_SUFFIX), p.shape)
                if problem is None and value.is_floating_point() and value.dtype not in (state_dtype(p), torch.bfloat16):
                    problem = (f"state {key!r} is {value.dtype}; expected {state_dtype(p)} (or a compact format: "
                               "bfloat16, 8-bit codes)")
                if problem is None and dist_utils.local(value).device != dist_utils.local(p).device:
                    problem = f"state {key!r} is on {dist_utils.local(value).device}, its param on {dist_utils.local(p).device}"
                if problem is not None:
                    raise ValueError(f"{owner}: param {i} of param group {group_index}: {problem}")
                continue
            if key == "step":
                ok = isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.float32
                want = "a one-element float32 tensor"
            else:
                local = dist_utils.local(p)
                ok = (isinstance(value, torch.Tensor) and value.shape == p.shape and value.dtype == state_dtype(p)
                      and dist_utils.local(value).device == local.device)
                want = f"a {state_dtype(p)} tensor of the param's shape {list(p.shape)} on {local.device}"
            if not ok:
                got = (f"{value.dtype} {list(value.shape)} on {value.device}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ValueError(f"{owner}: state {key!r} of param {i} of param group {group_index} is {got}; "
                                 f"expected {want}")


def check_plan(owner: str, plan) -> None:
    """Checks that need the buckets, before anything is updated: buckets whose params were
    converted since their states were made; a capturable group's tensor lr must sit on the device
    of every bucket whose backend reads it there (copying it from elsewhere is a host read or cannot
    be captured); then the graph-capture checks."""
    several = sum(len(buckets) for _, _, buckets in plan) > 1
    for group_index, group, buckets in plan:
        for bucket in buckets:
            _check_bucket_still_fits(owner, group_index, bucket, several)
        lr = group["lr"]
        if not (group["capturable"] and isinstance(lr, torch.Tensor)):
            continue
        for bucket in buckets:
            if bucket.backend.capturable and lr.device != bucket.device:
                raise ValueError(f"{owner}: param group {group_index} has capturable=True and its lr tensor on "
                                 f"{lr.device}, but params on {bucket.device}: put lr on the params' device")
    _check_graph_capture(owner, plan)


def _check_bucket_still_fits(owner: str, group_index: int, bucket, every_param: bool) -> None:
    """A cached bucket whose params changed dtype or device since their states were made (e.g.
    model.double() or model.cuda() after a step) would fail in its kernel's checks, possibly after
    other buckets were updated: refuse it before anything is touched. ``every_param``: all of them
    (a step with several buckets); else the first (one bucket: its kernel refuses the rest before
    it writes, and a whole-module conversion changes all of them)."""
    if bucket.lists is None:
        return
    params = bucket.params if every_param else bucket.params[:1]
    dtypes, devices = set(map(operator.attrgetter("dtype"), params)), set(map(operator.attrgetter("device"), params))
    if dtypes != {bucket.dtype} or devices != {bucket.device}:
        p = next(q for q in params if q.dtype != bucket.dtype or q.device != bucket.device)
        raise RuntimeError(
            f"{owner}: param group {group_index} has params that are now {p.dtype} on {p.device}, but their "
            f"optimizer states were made for {bucket.dtype} on {bucket.device} (the model was converted after a "
            "step, e.g. model.double() or model.to(device)). Convert the model before its first step, or re-place "
            "the states after converting: opt.load_state_dict(opt.state_dict())")


def _check_graph_capture(owner: str, plan) -> None:
    """Refuse a step that a CUDA graph would record wrongly: a non-capturable group counts steps on
    the host (the captured graph would replay one frozen step count), only capturable backends read
    nothing on the host, and a bucket's first step creates its states (a graph would replay that
    creation, resetting them at every replay)."""
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    for group_index, group, buckets in plan:
        if not group["capturable"]:
            raise RuntimeError(f"{owner}: param group {group_index} is stepped inside CUDA graph capture but has "
                               "capturable=False; construct the optimizer with capturable=True")
        for bucket in buckets:
            if bucket.lists is None:
                raise RuntimeError(f"{owner}: param group {group_index} has params whose optimizer state is not "
                                   "created yet, or the set of params with grads changed: run warm-up steps with "
                                   "the same params outside the capture first")
            if not bucket.backend.capturable:
                raise RuntimeError(f"{owner}: backend {bucket.backend.name!r} cannot be captured in a CUDA graph "
                                   f"(it reads values on the host); param group {group_index} needs one that can: "
                                   f"{' or '.join(map(repr, backends.CAPTURABLE))}")
