"""The optimizer classes (optimizers.py) and their machinery: base.py (lazy state, step loop,
metrics), checks.py (every validation), plan.py (buckets and caches), state_dict.py (checkpoints).
They name no backend: ``backends.select`` chooses, and they ask the chosen record's capabilities."""
from .base import BregmanOptimizer
from .optimizers import AdaBreg, LinBreg, ProxSGD

__all__ = ["LinBreg", "AdaBreg", "ProxSGD", "BregmanOptimizer"]
