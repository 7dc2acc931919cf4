"""The shared optimizer machinery: lazy state, the step loop, metrics and checkpoints.

The math lives in the backends (backends/reference.py is the spec) and is reached through
``functional.fused_step``; checks are in checks.py, buckets and their caches in plan.py. State
keys are the same for every backend, so checkpoints move freely between backends and devices:
``step``, ``dual``, ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``.

``capturable=True`` (per group, as in torch.optim) keeps ``step`` on the param's device and lets
``lr`` be a device tensor, so that a step on a capturable backend reads nothing on the host and
can be captured in a CUDA graph (backends/reference.py [note: capturable]).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .. import backends
from .. import distributed as dist_utils
from ..backends.contract import Hyper, Kind, StepTensors, state_dtype
from ..backends.layout import in_layout_of
from ..functional import dual_from_theta, fused_step, step_count
from ..regularizers import NoReg
from . import checks, moment_states
from .plan import Bucket, CountsBuffers, Plans
from .state_dict import load_state_dict, state_dict
from .tracked_state import TrackedState


def layout_like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A new state tensor holding ``value``, laid out like p's (local) memory: a channels_last param
    gets channels_last states, which the fused kernels then update in place (layout.py [note:
    dense views]). DTensor states keep the contiguous local layout that their DTensor wrapper
    describes."""
    if dist_utils.is_dtensor(p) or dist_utils.is_dtensor(value):
        return value.clone().contiguous()
    return in_layout_of(value, p)


def placed_step(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """state["step"], moved once to where ``functional.step_count`` puts it (the capturable flag
    may have been switched since the state was made, or a checkpoint loaded)."""
    device = step_count(p, group["capturable"]).device
    if state["step"].device != device:
        state["step"] = state["step"].to(device)
    return state["step"]


class BregmanOptimizer(Optimizer):
    """Shared machinery of LinBreg, AdaBreg and ProxSGD: subclasses say which states a step needs
    (``_state_lists``) and how a group's keys become a ``Hyper`` record (``_hyper``)."""

    _kind: Kind
    _has_dual = True
    # GradScaler hands over ``grad_scale`` / ``found_inf`` instead of unscaling itself
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any], backend: str, torch_keywords: dict[str, Any] | None = None):
        checks.check_torch_keywords(type(self).__name__, torch_keywords or {})
        # backend is an attribute, not a group key: a checkpoint must not pin the backend it was saved with
        self.backend = backends.check_name(backend)
        super().__init__(params, defaults)
        self._counts = CountsBuffers()
        self._plans = Plans()
        self._seen_state_version = -1  # the opt.state version the cached state lists were built from
        # what add_param_group checked: each group's regularizer object and set of keys
        self._checked_regs = [g["reg"] for g in self.param_groups]
        self._checked_keys = [frozenset(g) for g in self.param_groups]
        backends.prepare(self.backend, {p.device for g in self.param_groups for p in g["params"]})

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            if not isinstance(value, TrackedState):
                value = TrackedState(value)  # torch's __init__ and load_state_dict assign a plain defaultdict
            self.__dict__["_seen_state_version"] = -1  # another mapping: its version says nothing
        super().__setattr__(name, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # unpickling and torch's load_state_dict update __dict__ directly
        self.state = self.__dict__["state"]
        if "_plans" in self.__dict__:
            self._plans.drop_lists()
        else:  # unpickled or deep-copied: torch's __getstate__ keeps only defaults, state and groups
            self.backend = backends.check_name(self.__dict__.get("backend", "auto"))
            self._counts, self._plans = CountsBuffers(), Plans()
            self._checked_regs, self._checked_keys = [], []  # checked again at the next step

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "backend": self.backend}

    # -- argument checks (checks.py) -------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group) if isinstance(param_group, dict) else param_group
        if isinstance(param_group, dict) and param_group.get("reg") is None and "reg" in param_group:
            param_group["reg"] = NoReg()
        super().add_param_group(param_group)
        owner = type(self).__name__
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            checks.check_params(owner, [group], first_index=len(self.param_groups) - 1)
            checks.check_lr_value(group["lr"])  # a device lr too: adding a group may sync
        except Exception:
            self.param_groups.pop()
            raise
        checks.check_group_keys(owner, param_group if isinstance(param_group, dict) else {}, self.defaults)
        if "_checked_keys" in self.__dict__:  # a group added after construction: checked now
            self._checked_regs.append(group["reg"])
            self._checked_keys.append(frozenset(group))
        self._warn_pitfalls(group)

    def _warn_pitfalls(self, group: dict[str, Any]) -> None:
        """Settings that run but are known to train badly (README: Known pitfalls)."""

    def _check_group(self, group: dict[str, Any]) -> None:
        checks.check_options(type(self).__name__, group, self.defaults)
        checks.check_group(group, self._has_dual)

    def _check_edited_groups(self, owner: str, rebuilt: bool, added: list[torch.Tensor]) -> None:
        """What add_param_group checked once, again where a group was edited since the last step:
        its params (``check_params``: every one where a group's regularizer object was replaced,
        else, where buckets were rebuilt, the duplicates over all groups, e.g. a param appended to a
        second group, and one by one the params the rebuild ``added``); and its keys, when their set
        changed (a misspelt key added later warns as at construction). The signatures are
        remembered once the checks passed."""
        if torch.compiler.is_compiling():
            # a trace runs these checks once per graph, as Python, and dynamo guards on what they
            # read; remembering anything here would change those guards and recompile
            checks.check_params(owner, self.param_groups, at_step=True)
            return
        regs = [g["reg"] for g in self.param_groups]
        new_regs = len(regs) != len(self._checked_regs) or any(map(operator.is_not, regs, self._checked_regs))
        if new_regs or rebuilt:
            # forgotten until the checks pass: the buckets are cached already, so a refused step
            # retried unchanged would otherwise not be checked again
            self._checked_regs = []
            checks.check_params(owner, self.param_groups, at_step=True, only=None if new_regs else set(map(id, added)))
            self._checked_regs = regs
        keys = self._checked_keys
        if len(keys) != len(self.param_groups) or any(g.keys() != k for g, k in zip(self.param_groups, keys)):
            for i, group in enumerate(self.param_groups):
                if i >= len(keys) or group.keys() != keys[i]:
                    checks.check_group_keys(owner, group, self.defaults)
            self._checked_keys = [frozenset(g) for g in self.param_groups]

    # -- what subclasses say ----------------------------------------------------------------------
    def _state_signature(self, group: dict[str, Any]) -> tuple:
        """Group settings that decide which state lists a bucket needs (cache key part)."""
        return ()

    def _state_lists(self, group: dict[str, Any], params: list[torch.Tensor], states: list[dict[str, Any]],
                     fmt: str) -> dict[str, list[torch.Tensor]]:
        """The bucket's state lists by StepTensors field (duals, exp_avgs, exp_avg_sqs and the 8-bit
        scales), making the moments a step needs (zeros) in the bucket's moments format ``fmt``, or
        converting them to it (moment_states.ensure)."""
        raise NotImplementedError

    def _uses_moments(self, group: dict[str, Any]) -> bool:
        """Whether a step of this group keeps moments (whose format ``group["moments"]`` sets)."""
        return False

    def _moments_format(self, group: dict[str, Any], p: torch.Tensor) -> str:
        """The format p's moments are stored in (backends/moments.py), "fp32" without moments."""
        return moment_states.target_format(p, group) if self._uses_moments(group) else "fp32"

    def _hyper(self, group: dict[str, Any]) -> Hyper:
        raise NotImplementedError

    def _state_keys(self) -> tuple[set[str], set[str]]:
        """(keys a param's state may hold, keys it must hold once it exists). An 8-bit moment's
        block scales are in ``<moment>_scale``."""
        needed = {"step", "dual"} if self._has_dual else {"step"}
        scales = {k + moment_states.SCALE_SUFFIX for k in self._moment_keys}
        return needed | set(self._moment_keys) | scales, needed | set(self._moment_keys_needed)

    _moment_keys: tuple[str, ...] = ()  # moments a state may hold
    _moment_keys_needed: tuple[str, ...] = ()  # moments it must hold (made together with the dual)

    # -- state ----------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = step_count(p, group["capturable"])
            if self._has_dual:
                dual = dual_from_theta(dist_utils.local(p.detach()), group["reg"], group["delta"])
                state["dual"] = dist_utils.like_param(layout_like(dual, p), p)
        return state

    def reinit_dual(self, group_index: int | None = None) -> None:
        """Recompute the duals from the current θ (v = θ/δ + ∂J(θ)), e.g. after λ or δ changed.

        θ is unchanged by this: the next step continues from the same weights.
        """
        if group_index is not None and (isinstance(group_index, bool) or not isinstance(group_index, int)
                                        or not -len(self.param_groups) <= group_index < len(self.param_groups)):
            raise ValueError(f"Invalid group_index: {group_index!r} (this optimizer has {len(self.param_groups)} "
                             "param groups; None re-initializes all)")
        groups = self.param_groups if group_index is None else [self.param_groups[group_index]]
        for group in groups:  # every check first: a refused call changes no dual
            self._check_group(group)
        for group in groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "dual" in state:
                    dual = dual_from_theta(dist_utils.local(p.detach()), group["reg"], group["delta"])
                    dist_utils.local(state["dual"]).copy_(dual)

    def _bucket_lists(self, group: dict[str, Any], bucket: Bucket) -> dict[str, list[torch.Tensor]]:
        """A bucket's first step: lazy state, then the lists the backends update (local shards)."""
        states = [self._init_state(p, group) for p in bucket.params]
        lists = self._state_lists(group, bucket.params, states, bucket.moments)
        lists = {k: [dist_utils.local(t) for t in ts] for k, ts in lists.items()}
        lists["params"] = [dist_utils.local(p) for p in bucket.params]
        lists["steps"] = [placed_step(s, p, group) for p, s in zip(bucket.params, states)]
        return lists

    # -- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step. Returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        # every check for every group and bucket runs before anything is written: a step that
        # fails changes no parameter and no state
        calls = self._prepare(type(self).__name__)
        for group_index, group, bucket, hyper, tensors in calls:
            counts = fused_step(bucket.backend, tensors, hyper, group["reg"], grad_scale=grad_scale,
                                found_inf=found_inf, capturable=group["capturable"])
            if counts is not None:
                self._counts.record(group_index, group["capturable"], bucket, counts)
        return loss

    def _prepare(self, owner: str) -> list[tuple[int, dict[str, Any], Bucket, Hyper, StepTensors]]:
        """The backend calls of this step, every check done: groups, buckets and their backends,
        states (rebuilt from opt.state where it was edited, made where missing), and each call's
        tensors (the first call's backend checks its own before it writes)."""
        for group in self.param_groups:
            self._check_group(group)
        plan = []
        self._plans.start_step()
        for group_index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            checks.check_sparse_grads(owner, params)
            buckets = self._plans.buckets(group_index, group, params, self.backend, self._state_signature(group),
                                          lambda p, group=group: self._moments_format(group, p))
            plan.append((group_index, group, buckets))
        self._check_edited_groups(owner, self._plans.rebuilt, self._plans.added)
        if self.state.version != self._seen_state_version:  # opt.state was edited: rebuild from it
            self._plans.drop_lists()
        checks.check_plan(owner, plan)
        allowed, needed = self._state_keys()
        fresh = [(group_index, group, bucket) for group_index, group, buckets in plan for bucket in buckets
                 if bucket.lists is None]
        for group_index, group, bucket in fresh:
            checks.check_states(owner, group_index, bucket.params, self.state, allowed, needed, self._moment_keys)
        for group_index, group, bucket in fresh:
            bucket.lists = self._bucket_lists(group, bucket)
        self._seen_state_version = self.state.version
        calls = [(group_index, group, bucket, self._hyper(group), self._step_tensors(bucket))
                 for group_index, group, buckets in plan for bucket in buckets]
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for _, _, bucket, hyper, tensors in calls[1:]:
            bucket.backend.check(tensors, hyper, grad_scale, found_inf)
        return calls

    @staticmethod
    def _step_tensors(bucket: Bucket) -> StepTensors:
        lists = bucket.lists
        grads = [p.grad for p in bucket.params]
        return StepTensors(lists["params"], [dist_utils.local(g) for g in grads] if bucket.sharded else grads,
                           lists.get("duals", []), lists.get("exp_avgs", []), lists.get("exp_avg_sqs", []),
                           lists["steps"], lists.get("exp_avg_scales", []), lists.get("exp_avg_sq_scales", []))

    @staticmethod
    def _step_lr(group: dict[str, Any]) -> float | torch.Tensor:
        """The lr handed to the backend, as the group holds it: a tensor lr stays a tensor (it is read
        where it is used, by the kernels or the op, so a step needs no host read of it in capturable
        groups and a compiled step does not recompile when a scheduler changes its value)."""
        return group["lr"]

    # -- metrics --------------------------------------------------------------------------------
    def backends(self) -> list[dict[tuple, str]]:
        """Which backend updates each bucket: per param group, {(device, dtype): backend name}, the
        key being (device, dtype, format) for a bucket of compact moments ("bf16", "8bit").

        ``self.backend`` is what was asked for (e.g. ``"auto"``); this is what runs, as chosen at the
        group's latest step (``{}`` for a group not stepped yet, and after ``load_state_dict`` until
        the next step)."""
        return [self._plans.backend_names(i) for i in range(len(self.param_groups))]

    def _nonzeros(self) -> dict[torch.Tensor, torch.Tensor]:
        return self._counts.nonzeros()

    def density(self) -> float:
        """Fraction of non-zero entries over all regularized parameters (over all parameters if
        none is regularized), from the counts the kernels wrote during the last step.

        With DTensor (FSDP2) parameters this sums over all ranks: call it on every rank."""
        regularized = [p for g in self.param_groups if g["reg"].kind != "none" for p in g["params"]]
        params = regularized or [p for g in self.param_groups for p in g["params"]]
        counts = self._nonzeros()
        # a parameter that has not been stepped yet (or had no grad) is counted directly
        nnz = [(float(counts[p]) if p in counts else float(torch.count_nonzero(dist_utils.local(p))), p) for p in params]
        numel = [(float(dist_utils.local(p).numel()), p) for p in params]
        total = dist_utils.global_sum(numel)
        return dist_utils.global_sum(nnz) / total if total > 0 else 0.0

    @torch.no_grad()
    def evaluate_reg(self) -> list[float]:
        """J(θ) of each param group (0 for unregularized groups); summed over ranks for DTensors."""
        out = []
        for g in self.param_groups:
            parts = [(float(g["reg"].value(dist_utils.local(p))), p) for p in g["params"]]
            out.append(dist_utils.global_sum(parts) if parts else 0.0)
        return out

    # -- checkpoints (state_dict.py) -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_dict(self, state_dict, super().load_state_dict)
        self._counts.clear_latest()
        self._plans.clear()

    def _place_state(self, key: str, value: torch.Tensor, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """A loaded state tensor, where and how this optimizer keeps it."""
        if key == "step":
            return torch.as_tensor(value, dtype=torch.float32).to(step_count(p, group["capturable"]).device, copy=True)
        return layout_like(value.to(device=p.device, dtype=state_dtype(p)), p)
