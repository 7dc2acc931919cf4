"""How a run initialises each layer type, decided once from its configuration.

``loop.init_weights`` applies this plan and ``python -m bregman_fused.train --help`` prints it, so
the help shows the init that really runs. No torch import here: ``--help`` stays fast.

Rules (the configuration keys are the presets' FIELDS):

- ``density < 1``: Linear weights are sparsified with ``sparse_linear``, Conv weights with
  ``sparse_conv`` (``bf.sparsify_``: survivors Kaiming-normal × ``init_scale`` / ``init_scale_conv``,
  default 1/√(mask density); biases of those layers ~ U(0, 1/√fan_in)); ``"none"`` leaves that
  layer type as the model built it (PyTorch's default dense init).
- ``density >= 1`` (the dense baselines): every Linear and Conv layer gets the same dense
  Kaiming-normal init and non-negative biases, whatever ``sparse_*`` says, so dense and sparse runs
  differ only in the mask.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["LayerInit", "layer_inits", "describe", "has_convs"]


@dataclasses.dataclass(frozen=True)
class LayerInit:
    mode: str | None  # a bf.sparsify_ mode; None: keep the init the model was built with
    density: float
    scale: float | None  # factor on the Kaiming std of the survivors; None: 1/√(mask density)

    def describe(self) -> str:
        if self.mode is None:
            return "PyTorch's default init (dense)"
        if self.density >= 1.0:
            factor = "" if self.scale is None or self.scale == 1.0 else f" ×{self.scale:g}"
            return f"dense Kaiming-normal{factor}"
        if self.scale is None:
            # elementwise masks keep `density` of the entries; group masks ceil(density·groups), ~ the same
            factor = f"×{1 / math.sqrt(self.density):.3g} (1/√density)" if self.density > 0 else "×0"
        else:
            factor = f"×{self.scale:g}"
        return f"{self.mode} {self.density * 100:g} %, Kaiming std {factor}"


def layer_inits(cfg: dict[str, Any]) -> dict[str, LayerInit]:
    """{"linear": ..., "conv": ...}: the init of each layer type (rules in the module doc)."""
    density = float(cfg["density"])
    linear = None if cfg["sparse_linear"] == "none" else cfg["sparse_linear"]
    conv = None if cfg["sparse_conv"] == "none" else cfg["sparse_conv"]
    if density >= 1.0:
        linear, conv = linear or "elementwise", conv or "kernel"  # dense: every layer gets the same init
    return {"linear": LayerInit(linear, density, cfg["init_scale"]),
            "conv": LayerInit(conv, density, cfg["init_scale_conv"])}


def has_convs(cfg: dict[str, Any]) -> bool:
    """Whether the configuration speaks of conv layers (the MLP presets set both conv keys to "none")."""
    return cfg["conv_reg"] != "none" or cfg["sparse_conv"] != "none"


def describe(cfg: dict[str, Any]) -> str:
    """One line: the init per layer type, e.g. "linear elementwise 1 %, Kaiming std ×5; conv ..."."""
    plan = layer_inits(cfg)
    parts = [f"linear {plan['linear'].describe()}"]
    if has_convs(cfg):
        parts.append(f"conv {plan['conv'].describe()}")
    return "; ".join(parts)
