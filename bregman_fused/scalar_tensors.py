"""Python numbers as 0-d tensors for the spec's ops, made so that every device and torch.compile
compute with the number's current value, rounded once.

[note: numbers as tensors] Two torch behaviours make a Python number unsafe as an op argument:
- torch's CUDA kernels divide by a host number as a multiplication by its reciprocal (one bit can
  be lost), and ``number / tensor`` is ``tensor.reciprocal() * number`` on every device;
- under torch.compile, a float that changed between calls becomes symbolic, and torch 2.14's
  inductor bakes its first value into ``torch.clamp``'s bounds and ``torch.full``'s fill value
  while arithmetic follows it (pytorch/pytorch#194976, #197889): a compiled ProxSGD step with an
  lr schedule thresholded with a stale lr.
So the spec divides by, and clamps to, ``scalar_like(x, number)``: the number added to a 0-d zero
of x's dtype on x's device, an add that rounds it once, as a cast would, and that compiles as
arithmetic."""
from __future__ import annotations

import torch

__all__ = ["scalar_like"]


def scalar_like(x: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` as a 0-d tensor of x's dtype on x's device (see the note above)."""
    return x.new_zeros(()) + value
