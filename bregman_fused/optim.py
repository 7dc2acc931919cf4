"""Optimizer classes: argument checks, lazy state, bucketing and the backend call.

The math lives in the backends (``reference.step`` is the spec); these classes only decide what
to update and keep the state. State keys are the same for every backend, so checkpoints move
freely between backends and devices: ``step``, ``dual``, ``momentum_buffer``, ``exp_avg``,
``exp_avg_sq``.

``capturable=True`` (per group, as in torch.optim) keeps ``step`` on the param's device and lets
``lr`` be a device tensor, so that a step on the cuda/triton backends reads nothing on the host and
can be captured in a CUDA graph (reference.py [note: capturable]).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import distributed as dist_utils
from ._layout import in_layout_of
from .functional import check_backend_name, select_backend
from .regularizers import NoReg, Regularizer, regularizer_from_dict

__all__ = ["LinBreg", "AdaBreg", "ProxSGD"]


def _finite(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (must be a number)") from None
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    return value


def _in_unit_interval(name: str, value: Any) -> None:
    if not 0.0 <= _finite(name, value) < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def _check_lr_value(lr: Any) -> None:
    if _finite("lr", lr) < 0.0:
        raise ValueError(f"Invalid lr: {float(lr)} (must be >= 0)")


def _step_lr(group: dict[str, Any]) -> float | torch.Tensor:
    """The lr handed to the backend: a tensor lr stays a tensor in a capturable group (reading it
    would sync, and a captured graph must read its current value at every replay)."""
    lr = group["lr"]
    if group["capturable"] and isinstance(lr, torch.Tensor):
        return lr
    return float(lr)


def _step_device(p: torch.Tensor, group: dict[str, Any]) -> torch.device:
    """Where a param's step counter lives: on its device in capturable groups (so the kernels read
    and increment it without a host sync, as torch's capturable optimizers do), else on the CPU."""
    return p.device if group["capturable"] else torch.device("cpu")


def _placed_step(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """state["step"], moved once where ``_step_device`` wants it (the capturable flag may have
    been switched since the state was made, or a checkpoint loaded)."""
    device = _step_device(p, group)
    if state["step"].device != device:
        state["step"] = state["step"].to(device)
    return state["step"]


def _check_bucket_still_fits(name: str, group_index: int, bucket: _Bucket) -> None:
    """A cached bucket whose params changed dtype or device since their states were made (e.g.
    model.double() or model.cuda() after a step) would fail in its kernel's checks, possibly after
    other buckets were updated: refuse it before anything is touched. One param per bucket: a
    whole-module conversion changes all of them."""
    if bucket.lists is None:
        return
    p = bucket.params[0]
    device, dtype = bucket.key
    if p.dtype != dtype or p.device != device:
        raise RuntimeError(
            f"{name}: param group {group_index} has params that are now {p.dtype} on {p.device}, but their "
            f"optimizer states were made for {dtype} on {device} (the model was converted after a step, e.g. "
            "model.double() or model.to(device)). Convert the model before its first step, or re-place the "
            "states after converting: opt.load_state_dict(opt.state_dict())")


def _check_plan(name: str, plan) -> None:
    """Checks that need the buckets, before anything is updated: a capturable group's tensor lr must
    sit on the device of every bucket that the GPU backends update (they read it there, and copying
    it from elsewhere is a host read or cannot be captured); then the graph-capture checks."""
    for group_index, group, buckets in plan:
        for bucket in buckets:
            _check_bucket_still_fits(name, group_index, bucket)
        lr = group["lr"]
        if not (group["capturable"] and isinstance(lr, torch.Tensor)):
            continue
        for bucket in buckets:
            if bucket.backend in ("cuda", "triton") and lr.device != bucket.key[0]:
                raise ValueError(f"{name}: param group {group_index} has capturable=True and its lr tensor on "
                                 f"{lr.device}, but params on {bucket.key[0]}: put lr on the params' device")
    _check_graph_capture(name, plan)


def _check_graph_capture(name: str, plan) -> None:
    """Refuse a step that a CUDA graph would record wrongly: a non-capturable group counts steps on
    the host (the captured graph would replay one frozen step count), only the cuda and triton
    backends read nothing on the host, and a bucket's first step creates its states (a graph
    would replay that creation, resetting them at every replay)."""
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    for group_index, group, buckets in plan:
        if not group["capturable"]:
            raise RuntimeError(f"{name}: param group {group_index} is stepped inside CUDA graph capture but has "
                               "capturable=False; construct the optimizer with capturable=True")
        for bucket in buckets:
            if bucket.lists is None:
                raise RuntimeError(f"{name}: param group {group_index} has params whose optimizer state is not "
                                   "created yet, or the set of params with grads changed: run warm-up steps with "
                                   "the same params outside the capture first")
            if bucket.backend not in ("cuda", "triton"):
                raise RuntimeError(f"{name}: backend {bucket.backend!r} cannot be captured in a CUDA graph (it "
                                   f"reads values on the host); param group {group_index} needs backend 'cuda' or "
                                   "'triton'")


def _state_layout(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A new state tensor holding ``value``, laid out like p's (local) memory: a channels_last param
    gets channels_last states, which the fused kernels then update in place (_layout [note: dense
    views]). DTensor states keep the contiguous local layout that their DTensor wrapper describes."""
    if dist_utils.is_dtensor(p) or dist_utils.is_dtensor(value):
        return value.clone().contiguous()
    return in_layout_of(value, p)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer states are float32 for float32/bf16/fp16 params (the dual is the master copy), else float64."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class _Bucket:
    """Params of one group that share a device and dtype: one backend call per step."""

    key: tuple  # (device, dtype)
    params: list[torch.Tensor]
    backend: str  # the backend that runs, chosen by functional.select_backend
    fn: Callable[..., Any]  # its step function
    lists: dict[str, list[torch.Tensor]] | None = None  # state tensors, filled at the first step
    sharded: bool = False  # DTensor params: backends get the local shards of params and grads
    counts: torch.Tensor | None = None  # where the backends' counts are copied (_counts_buffer)


class _BregmanBase(Optimizer):
    """Shared machinery of LinBreg, AdaBreg and ProxSGD."""

    _kind = ""  # "linbreg" | "adabreg" | "proxsgd"
    _has_dual = True
    # GradScaler hands over ``grad_scale`` / ``found_inf`` instead of unscaling itself
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any], backend: str):
        # backend is an attribute, not a group key: a checkpoint must not pin the backend it was saved with
        self.backend = check_backend_name(backend)
        super().__init__(params, defaults)
        # latest per-tensor non-zero counts written by the backends: {(group index, bucket key): (params, counts)}
        self._counts: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
        # capturable groups: one counts buffer per (group index, bucket key, param ids), see _counts_buffer
        self._counts_buffers: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
        # cached buckets per group index: (signature, params with grad, buckets)
        self._plans: dict[int, tuple[tuple, list[torch.Tensor], list[_Bucket]]] = {}

    # -- argument checks ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group) if isinstance(param_group, dict) else param_group
        if isinstance(param_group, dict) and param_group.get("reg") is None and "reg" in param_group:
            param_group["reg"] = NoReg()
        super().add_param_group(param_group)
        try:
            params = self.param_groups[-1]["params"]
            if len({id(p) for p in params}) != len(params):
                # torch only warns; a fused kernel would update the tensor twice, from two threads
                raise ValueError(f"{type(self).__name__}: a param group lists the same parameter twice")
            self._check_group(self.param_groups[-1])
            for p in self.param_groups[-1]["params"]:
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
                if not p.is_floating_point():
                    raise ValueError(f"{type(self).__name__} needs floating-point parameters (got {p.dtype})")
                self.param_groups[-1]["reg"].check_param(p)
                dist_utils.check_sharding(p, self.param_groups[-1]["reg"])
            _check_lr_value(self.param_groups[-1]["lr"])  # a device lr too: adding a group may sync
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """Checks run at every step; none of them reads a device tensor (a step must not sync)."""
        if not isinstance(group["capturable"], bool):
            raise TypeError(f"Invalid capturable: {group['capturable']!r} (must be True or False)")
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"Invalid lr: a tensor lr must hold one float32/float64 value, got {lr.dtype} "
                                 f"with {lr.numel()} elements")
            if lr.device.type == "cpu":
                _check_lr_value(lr)
        else:
            _check_lr_value(lr)
        reg = group["reg"]
        if not isinstance(reg, Regularizer):
            raise TypeError(f"Invalid reg: {reg!r} (must be a bregman_fused regularizer, e.g. bf.L1(lamda=1e-3))")
        for key, value in reg._params().items():
            if _finite(key, value) < 0.0:
                raise ValueError(f"Invalid {key}: {value} (must be >= 0)")
        if self._has_dual and not _finite("delta", group["delta"]) > 0.0:
            raise ValueError(f"Invalid delta: {group['delta']} (must be > 0)")

    # -- state ----------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_step_device(p, group))
            if self._has_dual:
                state["dual"] = dist_utils.like_param(_state_layout(self._dual_from_theta(p, group), p), p)
        return state

    @staticmethod
    def _dual_from_theta(p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """v = θ/δ + p with p ∈ ∂J(θ): then prox_{δJ}(δ·v) = θ, so a step continues from the current θ.
        Computed on the local shard (whole groups, see distributed.check_sharding)."""
        theta = dist_utils.local(p.detach()).to(state_dtype(p))
        return theta / group["delta"] + group["reg"].subgradient(theta)

    def reinit_dual(self, group_index: int | None = None) -> None:
        """Recompute the duals from the current θ (v = θ/δ + ∂J(θ)), e.g. after λ or δ changed.

        θ is unchanged by this: the next step continues from the same weights.
        """
        groups = self.param_groups if group_index is None else [self.param_groups[group_index]]
        for group in groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "dual" in state:
                    dist_utils.local(state["dual"]).copy_(self._dual_from_theta(p, group))

    # -- step -----------------------------------------------------------------------------------
    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        # torch's .grad setter already rejects grads of another device, dtype or shape
        out = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.layout != torch.strided for p in out):  # sparse COO/CSR/... grads
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return out

    def _state_signature(self, group: dict[str, Any]) -> tuple:
        """Group settings that decide which state lists a bucket needs (cache key part)."""
        return ()

    def _group_lists(self, group, params, states) -> dict[str, list[torch.Tensor]]:
        raise NotImplementedError

    def _hyper(self, group) -> dict[str, float]:
        raise NotImplementedError

    def _buckets(self, group_index: int, group: dict[str, Any]) -> list[_Bucket]:
        """The group's (device, dtype) buckets and their backends, cached while the set of params
        with grads, the backend, the regularizer type and the state layout stay the same.
        [note: step overhead] Rebuilding the lists costs ~µs per tensor in Python, which is a
        measurable share of a fused step on a CPU (and most of it for thousands of small tensors)."""
        params = self._params_with_grad(group)
        signature = (self.backend, type(group["reg"]), group["capturable"], self._state_signature(group))
        cached = self._plans.get(group_index)
        if (cached is not None and cached[0] == signature and len(cached[1]) == len(params)
                and all(map(operator.is_, cached[1], params))):
            return cached[2]
        by_key: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_key[(p.device, p.dtype)].append(p)
        buckets = [_Bucket(key, bucket, *select_backend(self.backend, key[0], group["reg"]),
                           sharded=any(map(dist_utils.is_dtensor, bucket)))
                   for key, bucket in by_key.items()]
        self._plans[group_index] = (signature, params, buckets)
        return buckets

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step. Returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        # check every group and pick every bucket's backend before touching anything: a call that
        # fails changes no parameter and no state
        plan = []
        for group_index, group in enumerate(self.param_groups):
            self._check_group(group)
            plan.append((group_index, group, self._buckets(group_index, group)))
        _check_plan(type(self).__name__, plan)
        for group_index, group, buckets in plan:
            hyper = self._hyper(group)
            for bucket in buckets:
                lists = bucket.lists
                if lists is None:  # first step of this bucket: lazy state, then cache the lists
                    states = [self._init_state(p, group) for p in bucket.params]
                    lists = self._group_lists(group, bucket.params, states)
                    # backends update plain tensors: the local shards of DTensor params and states
                    lists = {k: [dist_utils.local(t) for t in ts] for k, ts in lists.items()}
                    lists["param"] = [dist_utils.local(p) for p in bucket.params]
                    lists["step"] = [_placed_step(s, p, group) for p, s in zip(bucket.params, states)]
                    bucket.lists = lists
                grads = [p.grad for p in bucket.params]
                counts = bucket.fn(
                    self._kind,
                    lists["param"],
                    [dist_utils.local(g) for g in grads] if bucket.sharded else grads,
                    lists.get("dual", []),
                    lists.get("exp_avg", []),
                    lists.get("exp_avg_sq", []),
                    lists["step"],
                    reg=group["reg"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                    capturable=group["capturable"],
                    **hyper,
                )
                if counts is not None:
                    if bucket.counts is None:
                        bucket.counts = self._counts_buffer(group_index, group, bucket, counts)
                    else:
                        bucket.counts.copy_(counts)
                    self._counts[(group_index, bucket.key)] = (bucket.params, bucket.counts)
        return loss

    def _counts_buffer(self, group_index: int, group: dict[str, Any], bucket: _Bucket,
                       counts: torch.Tensor) -> torch.Tensor:
        """The buffer that will hold the latest non-zero counts of a bucket's params, ``counts`` in it.

        [note: counts buffer] A captured step copies its counts into this buffer at every replay,
        and an eager step between replays writes the same buffer, so density() always sees the step
        that ran last. In a capturable group the buffer is kept for the optimizer's lifetime per
        (group, device, dtype, params): a graph writes its address at every replay, so it must never
        be freed, and buckets rebuilt for the same params (another backend, capturable switched, a
        param without grad for a while) find it again. A bucket's first step, which makes the
        buffer, is never captured (_check_graph_capture refuses it)."""
        if not group["capturable"]:  # never written by a graph: the bucket's own copy will do
            return counts.clone()
        key = (group_index, bucket.key, tuple(map(id, bucket.params)))  # the params are kept: ids stay unique
        entry = self._counts_buffers.get(key)
        if entry is None:
            entry = self._counts_buffers[key] = (bucket.params, counts.clone())
        else:
            entry[1].copy_(counts)
        return entry[1]

    # -- metrics --------------------------------------------------------------------------------
    def _nonzeros(self) -> dict[torch.Tensor, torch.Tensor]:
        latest: dict[torch.Tensor, torch.Tensor] = {}
        for params, counts in self._counts.values():
            for p, c in zip(params, counts):
                latest[p] = c
        return latest

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

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # plain data instead of Regularizer objects: loadable with torch.load(weights_only=True)
        sd["param_groups"] = [{**g, "reg": g["reg"].to_dict()} for g in sd["param_groups"]]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = []
        for g, current in zip(state_dict["param_groups"], self.param_groups):
            g = dict(g)
            reg = g.get("reg")
            g["reg"] = regularizer_from_dict(reg) if isinstance(reg, dict) else (reg or NoReg())
            g.setdefault("capturable", current["capturable"])  # checkpoints from before the option
            groups.append(g)
        saved_state = state_dict["state"]
        saved_ids = [i for g in groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        group_of = {i: g for g in groups for i in g["params"]}
        # a checkpoint of another model would otherwise fail inside a kernel at the next step, after
        # the buckets before it were already updated; refuse it before anything is loaded
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if isinstance(value, torch.Tensor) and key != "step" and value.shape != p.shape:
                    raise ValueError(f"loaded state {key!r} of parameter {pid} has shape {tuple(value.shape)}, "
                                     f"but that parameter has shape {tuple(p.shape)}")
        super().load_state_dict({**state_dict, "param_groups": groups})
        # torch casts floating state to the param dtype; our states keep their own dtype (fp32 dual
        # for bf16 params), so restore them from the saved tensors bit for bit
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if isinstance(value, torch.Tensor) and key != "step":
                    self.state[p][key] = _state_layout(value.to(device=p.device, dtype=state_dtype(p)), p)
                elif key == "step":
                    self.state[p][key] = torch.as_tensor(value, dtype=torch.float32).to(
                        _step_device(p, group_of[pid]), copy=True)
        self._counts.clear()
        self._plans.clear()


class LinBreg(_BregmanBase):
    """Linearized Bregman iterations (stochastic mirror descent on the elastic net J_δ).

    ``momentum`` β > 0 uses the paper's form m ← β·m + (1−β)·τ·g; v ← v − m.
    Typical lr ≈ 0.1 (like SGD). With ``reg=NoReg()`` and δ = 1 this is exactly SGD.
    """

    _kind = "linbreg"

    def __init__(self, params: Iterable, lr: float = 0.1, reg: Regularizer | None = None, delta: float = 1.0,
                 momentum: float = 0.0, backend: str = "auto", capturable: bool = False):
        defaults = dict(lr=lr, reg=reg if reg is not None else NoReg(), delta=delta, momentum=momentum,
                        capturable=capturable)
        super().__init__(params, defaults, backend)

    def _check_group(self, group):
        super()._check_group(group)
        _in_unit_interval("momentum", group["momentum"])

    def _state_signature(self, group):
        return (group["momentum"] > 0,)

    def _group_lists(self, group, params, states):
        lists = {"dual": [s["dual"] for s in states]}
        if group["momentum"] > 0:
            for p, s in zip(params, states):
                if "momentum_buffer" not in s:
                    s["momentum_buffer"] = torch.zeros_like(s["dual"])
            lists["exp_avg"] = [s["momentum_buffer"] for s in states]
        return lists

    def _hyper(self, group):
        return dict(lr=_step_lr(group), beta1=float(group["momentum"]), beta2=0.0, eps=0.0,
                    delta=float(group["delta"]))


class AdaBreg(_BregmanBase):
    """Adam-type Bregman iterations: Adam's bias-corrected moments move the dual variable.

    An Adam-type method: use lr ≈ 1e-3. At lr = 0.1 every coordinate crosses the threshold within a
    few steps, the net densifies and training diverges (the reason a public reproduction "failed").
    With ``reg=NoReg()`` and δ = 1 this is exactly Adam.
    """

    _kind = "adabreg"

    def __init__(self, params: Iterable, lr: float = 1e-3, reg: Regularizer | None = None, delta: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, backend: str = "auto",
                 capturable: bool = False):
        defaults = dict(lr=lr, reg=reg if reg is not None else NoReg(), delta=delta, betas=betas, eps=eps,
                        capturable=capturable)
        super().__init__(params, defaults, backend)

    def _check_group(self, group):
        super()._check_group(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
        _in_unit_interval("beta1 (betas[0])", betas[0])
        _in_unit_interval("beta2 (betas[1])", betas[1])
        if _finite("eps", group["eps"]) < 0.0:
            raise ValueError(f"Invalid eps: {group['eps']} (must be >= 0)")

    def _group_lists(self, group, params, states):
        for s in states:
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros_like(s["dual"])
                s["exp_avg_sq"] = torch.zeros_like(s["dual"])
        return {"dual": [s["dual"] for s in states], "exp_avg": [s["exp_avg"] for s in states],
                "exp_avg_sq": [s["exp_avg_sq"] for s in states]}

    def _hyper(self, group):
        return dict(lr=_step_lr(group), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
                    eps=float(group["eps"]), delta=float(group["delta"]))


class ProxSGD(_BregmanBase):
    """Proximal SGD, the baseline: θ ← prox_{τJ}(θ − τ·g). No dual variable."""

    _kind = "proxsgd"
    _has_dual = False

    def __init__(self, params: Iterable, lr: float = 0.1, reg: Regularizer | None = None, backend: str = "auto",
                 capturable: bool = False):
        defaults = dict(lr=lr, reg=reg if reg is not None else NoReg(), capturable=capturable)
        super().__init__(params, defaults, backend)

    def _group_lists(self, group, params, states):
        return {}

    def _hyper(self, group):
        return dict(lr=_step_lr(group), beta1=0.0, beta2=0.0, eps=0.0, delta=1.0)
