"""Every validation of the optimizer classes, in one place.

Values are checked when they are set (constructor, ``add_param_group``) and again at every step,
since a group's keys can be edited between steps; ``check_plan`` runs for every group before any
tensor is written, so a refused step changes nothing. No check here reads a device tensor (a step
must not sync).
"""
from __future__ import annotations

import difflib
import operator
import warnings
from typing import Any

import torch

from .. import backends
from .. import distributed as dist_utils
from ..backends import moments
from . import moment_states
from ..backends.contract import state_dtype
from ..arguments import at_least_zero, check_lr_tensor, check_lr_value, in_unit_interval, positive
from ..regularizers import Regularizer


# group keys torch.optim's lr schedulers add; anything else a user adds (e.g. "name") is theirs
_SCHEDULER_KEYS = ("params", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "base_lr")
# torch.optim options these optimizers do not have: accepted at the value that asks for nothing
# (configs written for torch.optim carry them), refused otherwise, saying what to do instead
_TORCH_OPTIONS = {
    "maximize": (False, "negate the loss instead"),
    "weight_decay": (0, "θ is recomputed from the dual at every step, so a decay of θ would be undone; "
                        "regularize with reg= (e.g. bf.L1(lamda=...))"),
    "nesterov": (False, "LinBreg's momentum is the paper's m ← β·m + (1−β)·τ·g"),
    "dampening": (0, "LinBreg's momentum is the paper's m ← β·m + (1−β)·τ·g"),
    "amsgrad": (False, "AdaBreg keeps Adam's moments without the AMSGrad maximum"),
    "differentiable": (False, "the step is not differentiable"),
}
# torch.optim's choices of implementation (same math): any value, the backend decides (backend=)
_IMPLEMENTATION_KEYS = ("foreach", "fused")
# every option of LinBreg, AdaBreg and ProxSGD: one that this optimizer lacks would be ignored
_BREGMAN_OPTIONS = {"lr": "every", "reg": "every", "capturable": "every", "delta": "LinBreg and AdaBreg",
                    "momentum": "LinBreg", "betas": "AdaBreg", "eps": "AdaBreg", "moments": "LinBreg and AdaBreg"}
# the keys check_options looks at (a set: one intersection per group and step finds them)
_WATCHED = frozenset(_TORCH_OPTIONS) | frozenset(_BREGMAN_OPTIONS) | {"backend"}
# keys users reach for when they mean `reg`; each answered with what to write instead
_MEANT = {"lamda": "reg=bf.L1(lamda=...)", "lambda": "reg=bf.L1(lamda=...)", "lamda_l1": "reg=bf.SparseGroupL1L2(...)",
          "regs": "reg", "regularizer": "reg", "regularization": "reg", "penalty": "reg"}


def own_options(defaults: dict[str, Any]) -> set[str]:
    """The options of an optimizer: its defaults' keys without torch's (its __setstate__ adds
    "differentiable" to defaults)."""
    return set(defaults) - set(_TORCH_OPTIONS) - set(_IMPLEMENTATION_KEYS)


def check_options(owner: str, group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a group key that asks for math this optimizer would not do (checked at every step:
    keys can be edited between steps): a torch.optim option at a value other than its no-op one,
    an option of another Bregman optimizer, or ``backend`` (an argument of the optimizer); and a
    group that lost one of its options (``del group["lr"]``)."""
    if not defaults.keys() <= group.keys():
        options = own_options(defaults)
        lacking = sorted(options - set(group))
        if lacking:
            raise ValueError(f"{owner}: a param group lacks {lacking}: every group holds all options of {owner} "
                             f"({', '.join(sorted(options))}); set them again")
    for key in _WATCHED.intersection(group):
        if key in _TORCH_OPTIONS:
            no_op, instead = _TORCH_OPTIONS[key]
            if not _is_no_op(group[key], no_op):
                raise ValueError(f"{owner} has no option {key!r} (a param group sets {key}={group[key]!r}): "
                                 f"{instead}. Remove the key, or set it to {no_op!r}")
        elif key == "backend":
            raise ValueError(f"{owner}: 'backend' is not a param group option; the backend is an argument of the "
                             f"optimizer, for all its groups ({owner}(..., backend=...))")
        elif key not in defaults:
            raise ValueError(f"{owner} has no option {key!r} (it is one of {_BREGMAN_OPTIONS[key]}); a param group "
                             f"sets it: remove the key (options of {owner}: {', '.join(sorted(own_options(defaults)))})")


def check_torch_keywords(owner: str, keywords: dict[str, Any]) -> None:
    """Keyword arguments a constructor got beyond its own: torch.optim's options, judged as in a
    param group (refused unless at their no-op value, saying what to do instead; foreach/fused take
    any value: backend= decides), and not kept, since they ask for nothing. Any other keyword is a
    TypeError, as Python's own, with what was likely meant."""
    for key, value in keywords.items():
        if key in _TORCH_OPTIONS:
            no_op, instead = _TORCH_OPTIONS[key]
            if not _is_no_op(value, no_op):
                raise ValueError(f"{owner} has no option {key!r} ({key}={value!r}): {instead}. Remove the argument, "
                                 f"or set it to {no_op!r}")
        elif key not in _IMPLEMENTATION_KEYS:
            if key in _BREGMAN_OPTIONS:
                hint = f" ({key!r} is an option of {_BREGMAN_OPTIONS[key]})"
            elif key.lower() in _MEANT:
                hint = f"; did you mean {_MEANT[key.lower()]}?"
            else:
                hint = ""
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {key!r}{hint}")


def _is_no_op(value: Any, no_op: Any) -> bool:
    """``value`` equals the no-op value (False, or 0): a Python, numpy or one-element tensor scalar."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return False
        value = value.item()
    elif hasattr(value, "item") and not isinstance(value, (bool, int, float)):  # numpy scalars and 0-d arrays
        value = value.item()
    return isinstance(value, (bool, int, float)) and value == no_op


def check_group_keys(owner: str, group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Warn about a key that looks like a misspelt option: it would be silently ignored (e.g.
    "lamda" in a group leaves the group unregularized). Keys that resemble nothing stay silent.
    Runs when a group is added and when a group's set of keys changed since the last step."""
    known = set(defaults) | set(_SCHEDULER_KEYS) | set(_TORCH_OPTIONS) | set(_IMPLEMENTATION_KEYS)
    for key in group:
        if key in known or not isinstance(key, str):
            continue
        meant = _MEANT.get(key.lower()) or next(iter(difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)),
                                                None)
        if meant is not None:
            warnings.warn(f"{owner}: param group key {key!r} is not an option of {owner} and is ignored; did you mean "
                          f"{meant!r}? (options: {', '.join(sorted(defaults))})", UserWarning, stacklevel=4)


def check_params(owner: str, param_groups: list[dict[str, Any]], *, first_index: int = 0, at_step: bool = False,
                 only: set[int] | None = None) -> None:
    """The params of ``param_groups`` (numbered from ``first_index``): each listed once in its group
    and in one group only, real floating point, of a shape its group's regularizer can act on and
    sharded as it needs.

    Run by ``add_param_group`` for the new group alone (torch refuses a param already in another
    group), and at a step where a group's params with grads or its regularizer object changed
    (``at_step``: over all groups; an emptied group is then fine, it has nothing to step).
    ``only``: ids of the params to check one by one (those new in their buckets, plan.py), the
    others passed before; the duplicates are checked over all."""
    seen: set[int] = set()
    for group_index, group in enumerate(param_groups, start=first_index):
        params = group["params"]
        if len(params) == 0 and not at_step:
            raise ValueError(f"{owner}: a param group has no parameters (an iterator that was already used up, e.g. "
                             "model.parameters() passed twice? pass a list)")
        ids = set(map(id, params))
        if len(ids) != len(params):
            # torch only warns; a fused kernel would update the tensor twice, from two threads
            raise ValueError(f"{owner}: param group {group_index} lists the same parameter twice")
        if not ids.isdisjoint(seen):
            raise ValueError(f"{owner}: a parameter is in more than one param group (group {group_index} and an "
                             "earlier one); each parameter belongs to one group")
        seen |= ids
        reg = group["reg"]
        for p in params if only is None else [p for p in params if id(p) in only]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{owner}: param group {group_index} holds a {type(p).__name__}, not a tensor")
            if p.is_complex():
                raise ValueError(f"{owner} does not support complex parameters (got {p.dtype})")
            if not p.is_floating_point():
                raise ValueError(f"{owner} needs floating-point parameters (got {p.dtype})")
            reg.check_param(p)
            dist_utils.check_sharding(p, reg)


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
    checked when it is set (``add_param_group``, ``load_state_dict``) and, in eager steps, when it
    lives on the CPU (a cheap read); never on a GPU (a sync) or under torch.compile (a graph break,
    and a recompile per value)."""
    if not isinstance(group["capturable"], bool):
        raise TypeError(f"Invalid capturable: {group['capturable']!r} (must be True or False)")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        check_lr_tensor(lr)
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            check_lr_value(lr)
    else:
        check_lr_value(lr)
    reg = group["reg"]
    if not isinstance(reg, Regularizer):
        raise TypeError(f"Invalid reg: {reg!r} (must be a bregman_fused regularizer, e.g. bf.L1(lamda=1e-3))")
    for key, value in reg._params().items():
        at_least_zero(key, value)
    if has_dual:
        positive("delta", group["delta"])


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
    (a step with several buckets); else the first where the bucket's compiled op refuses a param of
    another dtype or device before it writes (with a hint to the way out; a whole-module conversion
    changes the first param too). The reference and Triton would step a partly converted bucket
    whose states still fit (float32 → bf16), so all of theirs are checked: every backend refuses
    the same models (their own checks read every tensor anyway)."""
    if bucket.lists is None:
        return
    params = bucket.params if every_param or not bucket.backend.compiled_op else bucket.params[:1]
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
