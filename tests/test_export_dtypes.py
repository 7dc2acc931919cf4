"""Export beyond fp32 MLPs: half-precision models, a checkpoint of a model trained on padded
images, and a BatchNorm without running statistics: the exported model runs and keeps the outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bregman_fused import export
from bregman_fused.export.convert import csr_unsupported
from bregman_fused.export.shrink import default_atol


def _sparse_mlp(dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 80), nn.ReLU(), nn.Linear(80, 10))
    with torch.no_grad():
        for layer in (m[0], m[2], m[4]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.03)
            layer.bias.uniform_(0, 0.2)
    return m.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shrink_of_a_half_precision_model_uses_its_dtypes_tolerance(dtype):
    # folding a dead unit's constant into the next bias rounds differently: ~1 ulp of the dtype,
    # which the fp32 default of 1e-5 called "a bug in export"
    m = _sparse_mlp(dtype)
    x = torch.randn(8, 256).to(dtype)
    small = export.shrink(m, x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        assert (small(x).float() - m(x).float()).abs().max() <= default_atol(m) * 4
    assert default_atol(_sparse_mlp(torch.float32)) == 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_to_sparse_keeps_a_layer_dense_where_torch_has_no_csr_kernel(dtype):
    m = _sparse_mlp(dtype)
    fast = export.to_sparse(m, min_numel=0)
    x = torch.randn(3, 256).to(dtype)
    with torch.no_grad():
        for batch in (x, x[:1]):  # batch 1 takes SparseLinear's mv path
            assert torch.allclose(fast(batch).float(), m(batch).float(), atol=1e-2 if dtype != torch.float32 else 1e-5)
    uses_csr = any(isinstance(mod, export.SparseLinear) for mod in fast.modules())
    reason = csr_unsupported(dtype, torch.device("cpu"))
    assert uses_csr == (reason is None)
    if reason is not None:
        assert any("no cpu CSR matmul" in note for note in fast.export_notes)


def test_resize_like_resizes_a_batchnorm_without_running_statistics():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                      nn.Conv2d(4, 3, 3)).eval()
    with torch.no_grad():
        m[0].weight[1:] = 0  # three dead channels
        m[0].bias[1:] = 0
        m[1].bias[1:] = -1.0  # ReLU(−1) = 0: they output nothing
    x = torch.randn(2, 2, 8, 8)
    small = export.shrink(m, x)
    fresh = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(4, 3, 3))
    export.resize_like(fresh, small.state_dict())
    fresh.load_state_dict(small.state_dict())
    assert fresh[1].num_features == small[1].num_features < 4


def test_a_checkpoint_of_a_vgg_on_padded_mnist_exports(tmp_path):
    # VGG pads MNIST's 28×28 to 32×32 in training; the export rebuilds the model at that size
    from bregman_fused.export.cli import load_checkpoint
    from bregman_fused.train import main

    run = tmp_path / "vgg"
    assert main(["--preset", "vgg13-mnist5k", "--fake-data", "32", "--epochs", "1", "--max-batches", "1",
                 "--batch-size", "8", "--out-dir", str(run), "--quiet", "--no-plot", "--no-progress",
                 "--device", "cpu"]) == 0
    model, identity = load_checkpoint(str(run))
    assert identity["input_shape"] == [1, 32, 32]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
