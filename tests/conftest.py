import os
import sys

# tests import the shared config table as a plain module
sys.path.insert(0, os.path.dirname(__file__))

# Without a CUDA GPU the Triton backend's kernels run in Triton's interpreter on the CPU. Triton
# reads the variable when the kernels are decorated, so it must be set before bregman_fused.triton
# is imported (i.e. here, before any test module is collected).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard requirement of the package
    pass
