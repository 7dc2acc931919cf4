"""``SparseLinear``: an inference-only Linear whose weight is stored as a CSR tensor.

Which call is fast matters more than the format (measured on the 2-core CPU, torch 2.14.1, a
4096×4096 weight at 2 %, one thread): ``torch.sparse.mm(W_csr, x.t().contiguous()).t()`` runs on
MKL's sparse kernels (batch 32: 0.77 ms vs 14.5 ms dense ``F.linear``); with a non-contiguous
``x.t()`` the same call is 2.3× slower at batch 256 (18.4 vs 7.9 ms); ``F.linear(x, W_csr)`` is
4–8× slower at batch ≥ 32 (issue 16); at batch 1 ``torch.mv(W_csr, x)`` is another 2× faster than
the matrix product (0.15 vs 0.29 ms). COO is slower than dense, and BSR needs dense blocks, which
element-wise L1 sparsity does not make (at 2 % a 4×4 block is non-zero with probability 28 %, so BSR
would store 14× the values of CSR); so CSR it is.

The module keeps the state-dict keys of ``nn.Linear`` (``weight``, ``bias``); ``weight`` is a CSR
tensor in its state dict, and a dense or CSR ``weight`` loads into it. It runs under
``torch.no_grad()``, ``torch.jit.script``/``torch.jit.trace`` and ``torch.compile`` (see
``export/__init__.py`` for what each does with it). The output's last dim is a transposed view,
so a following ``SparseLinear`` gets its ``x.t()`` already contiguous (no copy).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

__all__ = ["SparseLinear", "to_csr"]


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (2-D, dense or CSR) as a CSR tensor, without torch's beta-support warning."""
    if weight.layout == torch.sparse_csr:
        return weight
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return weight.detach().to_sparse_csr()


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W stored as CSR (inference only: the weight is a buffer, not a parameter)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear: weight must be 2-D (out_features, in_features), got shape "
                             f"{list(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.register_buffer("weight", to_csr(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        return cls(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` with the same weights."""
        w = self.weight.to_dense()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def __deepcopy__(self, memo: dict) -> "SparseLinear":
        # the default deepcopy reads tensor storages, which CSR tensors do not have
        new = SparseLinear(self.weight.clone(), None if self.bias is None else self.bias.clone())
        new.train(self.training)
        memo[id(self)] = new
        return new

    @property
    def density(self) -> float:
        n = self.out_features * self.in_features
        return float(self.weight.values().numel()) / n if n else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1:
            y = torch.mv(self.weight, rows[0]).unsqueeze(0)
        else:
            y = torch.sparse.mm(self.weight, rows.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        shape = list(x.shape[:-1])
        shape.append(self.out_features)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format=csr, density={self.density:.4f}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        given = state_dict.get(key)
        if given is not None:  # dense or CSR: stored as CSR (Tensor.copy_ cannot copy into a CSR tensor)
            if tuple(given.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(given.shape)} from "
                                  f"checkpoint, the shape in current model is {(self.out_features, self.in_features)}.")
            else:
                self.weight = to_csr(given.to(self.weight.device, self.weight.dtype)).clone()
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if given is not None and key in missing_keys:
            missing_keys.remove(key)
