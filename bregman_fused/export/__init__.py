"""Sparse export: turn a network trained sparse into a smaller, faster model (issue 16).

    from bregman_fused import export
    small = export.shrink(model, example_inputs)  # dense model without dead neurons/channels, same outputs
    fast = export.to_sparse(small)                # CSR Linear layers where they are faster, same outputs
    export.save_sparse(model, "model.pt")         # only the non-zeros (values + int16/int32 indices or a bitmask)
    state = export.load_sparse("model.pt")        # a dense state dict for model.load_state_dict (bit-exact)
    print(export.report(model, example_inputs))   # per layer: shape, density, dead units, format, MACs

    python -m bregman_fused.export CHECKPOINT --out DIR      # a training checkpoint -> DIR
    python -m bregman_fused.train ... --out-dir RUN --export # the same at the end of a run

Files, one job each: ``graph`` (torch.fx channel-dependency tracer; ``graph_shapes``: its rules for
ops that move dimensions), ``shrink`` (removal and exact bias folding), ``sparse_linear`` (the CSR
layer), ``convert`` (``to_sparse``: which layers), ``serialize`` (compact checkpoints), ``report``,
``cli`` (the command line).

Dependency tracing: written here on torch.fx, not taken from torch-pruning. torch-pruning 1.6.1
was evaluated (installed aside, run on this package's models and torchvision's): it handled
torchvision's resnet18 and densenet121 and this package's ResNet18 (inner and residual channels,
outputs equal within 5e-7), but on this package's DenseNet (nested ``torch.cat([x, f(x)])``) its
concat index mapping failed — pruning a stem channel left the next conv expecting 6 input channels
for 4, and one dense layer's channel was grouped with the stem's — and on the skip-autoencoder it
pruned the ``skips`` vector along the wrong dimension and the forward failed. It also removes
units without looking at their values, so a dead MLP neuron (output act(b)) changed the output by
2e-2 unless its contribution were folded first, and folding needs the value each reader sees and
whether a zero-padded conv keeps it constant — a value analysis torch-pruning does not have. So
the exactness logic had to be written here anyway, and a tracer of its own (slots merged by a
union-find, anything unknown pinned; ``graph`` + ``graph_shapes``, ~500 lines) replaces a
5.6k-line dependency for the part that was left. requirements.txt is unchanged.

torch.jit / torch.compile of a ``to_sparse`` model (torch 2.14.1, CPU, tested): ``torch.jit.script``
works and keeps both paths (``torch.mv`` at batch 1, ``torch.sparse.mm`` above) and saves/loads;
``torch.jit.trace`` works but freezes the path of the traced batch size; ``torch.compile`` (also
``fullgraph=True``) returns the same outputs but compiles nothing: dynamo refuses sparse tensors
("torch.compile does not support sparse Tensors") and the model runs eagerly. A shrunk model is a
plain dense model: all of them apply.

Export works on eval mode: BatchNorm statistics are frozen at their running values, dropout is
off; a model in train mode gets a warning and the result is in eval mode.
"""
from .convert import DENSITY_THRESHOLD, MIN_NUMEL, to_sparse
from .errors import ExportError
from .report import Report, report
from .serialize import load_sparse, resize_like, save_sparse
from .shrink import shrink
from .sparse_linear import SparseLinear

__all__ = ["shrink", "to_sparse", "save_sparse", "load_sparse", "report", "resize_like", "Report", "SparseLinear",
           "ExportError", "DENSITY_THRESHOLD", "MIN_NUMEL"]
