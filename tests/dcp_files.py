"""The tensors of a torch.distributed.checkpoint (DCP) folder, for comparing two runs' checkpoints
(test_experiment_outputs.py, test_train_distributed.py)."""
from __future__ import annotations

import torch


def dcp_tensors(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Model + optimizer tensors of the DCP checkpoint in ``ckpt_dir``, flattened to {dotted name:
    tensor} (converted to a torch.save file beside it first)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = ckpt_dir + ".pt"
    dcp_to_torch_save(ckpt_dir, dst)
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[prefix + str(k)] = v

    walk(torch.load(dst, weights_only=False))
    return flat
