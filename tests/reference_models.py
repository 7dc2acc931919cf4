"""A small model, its batches and a training loop for the reference's tests (test_reference.py and
test_reference_mechanics.py)."""
from __future__ import annotations

import torch


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5), torch.nn.ReLU(),
        torch.nn.Linear(5, 2),
    ).to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 2, (4,), generator=g))
            for _ in range(n)]


def train(model, opt, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
