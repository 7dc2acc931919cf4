"""bregman_fused: sparse training with Bregman iterations (LinBreg, AdaBreg, ProxSGD), fused."""
from .optim import AdaBreg, LinBreg, ProxSGD
from .regularizers import GroupL1L2, KernelL1L2, L1, L1Pos, NoReg, Nuclear, Regularizer, SparseGroupL1L2
from . import functional, init, metrics, schedulers
from .groups import param_groups
from .memory import state_bytes
from .init import sparsify_
from .schedulers import LamdaScheduler

__version__ = "0.1.0"

__all__ = [
    "state_bytes",
    "LinBreg", "AdaBreg", "ProxSGD",
    "Regularizer", "NoReg", "L1", "L1Pos", "GroupL1L2", "KernelL1L2", "SparseGroupL1L2", "Nuclear",
    "functional", "init", "metrics", "schedulers", "param_groups", "sparsify_", "LamdaScheduler",
]
