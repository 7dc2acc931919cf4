"""Sparse export (issue 16): shrink is exact on the paper's architectures, to_sparse keeps the
outputs, save_sparse/load_sparse round-trips bit-exact and small, and bad input gets a clear answer.

Dead units are made by hand: zero incoming weights (a constant unit: its bias through BatchNorm and
ReLU), zero outgoing weights, or both; "exact" is the issue's bar, outputs within 1e-5 in fp32.
"""
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bregman_fused import export
from bregman_fused.experiments.models import MLP, ConvNet, DenseNet, ResNet18, SkipAutoencoder
from bregman_fused.init import sparsify_

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _same_outputs(a, b, *inputs):
    with torch.no_grad():
        ya, yb = a.eval()(*inputs), b.eval()(*inputs)
    assert ya.shape == yb.shape
    assert (ya - yb).abs().max() <= ATOL * max(1.0, float(ya.abs().max()))


@torch.no_grad()
def _kill(layer, units, bn=None, bn_bias=None, bias=None):
    """Zero the incoming weights of ``units``; set their bias / BatchNorm shift (the constant they output)."""
    layer.weight[units] = 0
    if bias is not None:
        layer.bias[units] = bias
    if bn is not None:
        bn.bias[units] = bn_bias


# -- shrink -----------------------------------------------------------------------------------------
def test_mlp_dead_neurons_are_folded_not_dropped():
    m = MLP((64, 200, 80, 10)).eval()
    _kill(m.layers[0], slice(0, 120), bias=torch.rand(120) + 0.1)  # constant ReLU(b) > 0: must be folded
    with torch.no_grad():
        m.layers[2].weight[:, 150:170] = 0  # no outgoing weights
    x = torch.randn(16, 64)
    small = export.shrink(m, x[:4])
    assert small.layers[0].out_features == 200 - 120 - 20 and small.layers[2].in_features == 60
    _same_outputs(m, small, x)
    assert any("folded into the bias of layers.2" in n for n in small.export_notes)
    # dropping them without the fold changes the output: the test can tell
    naive = MLP((64, 60, 80, 10)).eval()
    keep = torch.cat([torch.arange(120, 150), torch.arange(170, 200)])
    with torch.no_grad():
        naive.layers[0].weight.copy_(m.layers[0].weight[keep])
        naive.layers[0].bias.copy_(m.layers[0].bias[keep])
        naive.layers[2].weight.copy_(m.layers[2].weight[:, keep])
        naive.layers[2].bias.copy_(m.layers[2].bias)
        naive.layers[4].load_state_dict(m.layers[4].state_dict())
        assert (naive(x) - m(x)).abs().max() > 1e-2


class ConvBN(nn.Module):
    """The paper's ConvNet with BatchNorm after each conv (unpadded 5×5 convs)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def test_convnet_with_batchnorm_constant_channels_fold_through_pool_and_flatten():
    m = ConvBN().eval()
    _randomize_bn(m)
    f = m.features
    _kill(f[0], [0, 1, 2], bn=f[1], bn_bias=torch.tensor([-3.0, 0.7, 1.2]))  # zero, and two constants
    _kill(f[4], [5, 6], bn=f[5], bn_bias=torch.tensor([0.9, -2.0]))  # read by the Linear after flatten
    x = torch.randn(8, 1, 28, 28)
    small = export.shrink(m, x[:2])
    assert small.features[0].out_channels == 13 and small.features[1].num_features == 13
    assert small.features[4].out_channels == 14 and small.classifier[0].in_features == 14 * 16
    _same_outputs(m, small, x)


def test_paper_convnet_and_its_dead_linear_neurons():
    m = ConvNet().eval()
    _kill(m.features[0], [0, 1], bias=torch.tensor([-1.0, 0.5]))
    _kill(m.classifier[0], slice(0, 40), bias=torch.rand(40))
    x = torch.randn(4, 1, 28, 28)
    small = export.shrink(m, x[:2])
    assert small.features[0].out_channels == 62 and small.classifier[0].out_features == 88
    _same_outputs(m, small, x)


def test_resnet18_removes_dead_channels_exactly_and_keeps_the_unfoldable():
    m = ResNet18(3, 10, width=8).eval()
    _randomize_bn(m)
    b = m.layers[1][0]
    _kill(b.conv1, [0, 1, 2], bn=b.bn1, bn_bias=torch.full((3,), -5.0))  # zero after BN + ReLU: removable
    b2 = m.layers[1][1]
    _kill(b2.conv1, [4], bn=b2.bn1, bn_bias=torch.tensor([2.0]))  # constant 2-ish into a zero-padded conv: stays
    # residual stream channel 0 of stage 0: every producer of the add chain dead and zero after BN/ReLU
    for conv, bn in ((m.conv1, m.bn1), (m.layers[0][0].conv2, m.layers[0][0].bn2),
                     (m.layers[0][1].conv2, m.layers[0][1].bn2)):
        _kill(conv, [0], bn=bn, bn_bias=torch.tensor([-5.0]))
    x = torch.randn(4, 3, 32, 32)
    small = export.shrink(m, x[:2])
    assert small.layers[1][0].conv1.out_channels == 13 and small.layers[1][0].bn1.num_features == 13
    assert small.layers[1][1].conv1.out_channels == 16  # kept
    assert small.conv1.out_channels == 7 and small.layers[0][1].conv2.out_channels == 7
    assert small.layers[1][0].shortcut[0].in_channels == 7
    _same_outputs(m, small, x)
    assert any("layers.1.1.conv1: kept 1 dead unit" in n and "zero-padded" in n for n in small.export_notes)


def test_residual_channel_dead_in_only_one_branch_stays():
    m = ResNet18(3, 10, width=8).eval()
    _kill(m.layers[0][0].conv2, [0], bn=m.layers[0][0].bn2, bn_bias=torch.tensor([-5.0]))  # the skip still carries it
    x = torch.randn(2, 3, 32, 32)
    small = export.shrink(m, x)
    assert small.layers[0][0].conv2.out_channels == 8
    _same_outputs(m, small, x)


def test_torchvision_resnet18_inner_channels():
    m = torchvision.models.resnet18(num_classes=10).eval()
    _randomize_bn(m)
    _kill(m.layer3[1].conv1, list(range(20)), bn=m.layer3[1].bn1, bn_bias=torch.full((20,), -4.0))
    x = torch.randn(2, 3, 32, 32)
    small = export.shrink(m, x)
    assert small.layer3[1].conv1.out_channels == 236 and small.layer3[1].conv2.in_channels == 236
    _same_outputs(m, small, x)


def test_densenet_concatenations():
    m = DenseNet(1, 12, 10, depth=3, planes=4).eval()
    _kill(m.conv1, [1])  # no bias: 0 everywhere, read by every later conv through the concatenations
    _kill(m.block[1].conv, [2], bias=torch.tensor([-1.0]))  # ReLU(-1) = 0
    x = torch.randn(4, 1, 12, 12)
    small = export.shrink(m, x[:2])
    assert small.conv1.out_channels == 3 and small.block[1].conv.out_channels == 3
    assert small.block[0].conv.in_channels == 3 and small.transition.conv.in_channels == 4 * 4 - 2
    assert small.transition.conv.out_channels == 1  # read by position (out[:, -1]): stays
    _same_outputs(m, small, x)


def test_torchvision_densenet_with_batchnorm():
    m = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                    num_classes=10).eval()
    _randomize_bn(m)
    layer = m.features.denseblock1.denselayer1
    _kill(layer.conv2, [0, 3])  # read by later BN-ReLU-conv: BN turns 0 into a constant, which folds (1×1 conv)
    x = torch.randn(2, 3, 32, 32)
    small = export.shrink(m, x)
    assert small.features.denseblock1.denselayer1.conv2.out_channels == 2
    assert small.features.denseblock1.denselayer2.norm1.num_features == 8 + 4 - 2
    _same_outputs(m, small, x)


def test_skip_autoencoder_is_left_exact_with_the_reason():
    m = SkipAutoencoder(16, 3).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.skips.uniform_(-0.5, 0.5)
        m.layers[0].linear.weight[:4] = 0
    x = torch.randn(4, 16)
    small = export.shrink(m, x)
    _same_outputs(m, small, x)
    assert [p.shape for p in small.parameters()] == [p.shape for p in m.parameters()]
    # its features are tied to the model input by the skip sums: the note says so
    assert any("layers.0.linear: kept 4 dead units" in n and "add" in n for n in small.export_notes)


def test_no_dead_units_is_a_no_op():
    m = ConvBN().eval()
    x = torch.randn(2, 1, 28, 28)
    small = export.shrink(m, x)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), small.state_dict().values()))
    assert small.export_notes[0].startswith("nothing to remove")


def test_layer_with_every_unit_dead_keeps_one_and_stays_exact():
    m = MLP((64, 200, 80, 10)).eval()
    _kill(m.layers[0], slice(None), bias=torch.rand(200) - 0.3)  # some ReLU(b) = 0, some constants
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert float(m(x).std(0).max()) == 0.0  # the output is constant
    small = export.shrink(m, x[:2])
    assert small.layers[0].out_features == 1
    _same_outputs(m, small, x)
    assert any("last unit" in n for n in small.export_notes)


# -- to_sparse --------------------------------------------------------------------------------------
def _sparse_mlp(sizes=(256, 512, 512, 10), density=0.02):
    m = MLP(sizes).eval()
    sparsify_(m, density, linear="elementwise", conv=None, generator=torch.Generator().manual_seed(0))
    return m


def test_to_sparse_same_outputs_state_dict_and_jit():
    m = _sparse_mlp()
    fast = export.to_sparse(m)
    kinds = [type(l).__name__ for l in fast.layers if not isinstance(l, nn.ReLU)]
    assert kinds == ["SparseLinear", "SparseLinear", "Linear"]  # the 512×10 head is too small for CSR
    for batch in (1, 3, 32):
        x = torch.randn(batch, 256)
        _same_outputs(m, fast, x)
        with torch.no_grad():
            assert torch.equal(torch.jit.script(fast)(x), fast(x))
    sd = fast.state_dict()
    assert sd["layers.0.weight"].layout == torch.sparse_csr
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = export.to_sparse(_sparse_mlp(density=0.05))
    again.load_state_dict(torch.load(buf, weights_only=True))  # CSR into CSR
    _same_outputs(m, again, torch.randn(4, 256))
    again.load_state_dict(m.state_dict())  # a dense state dict loads too
    _same_outputs(m, again, torch.randn(4, 256))
    assert isinstance(fast.layers[0].to_linear(), nn.Linear)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(fast)(x), fast(x))  # CSR tensors have no storage to deep-copy
    notes = export.shrink(fast, x).export_notes
    assert any("layers.0 (SparseLinear)" in n and "then to_sparse" in n for n in notes)


def test_to_sparse_rule_and_measurement():
    m = _sparse_mlp((256, 512, 10), density=0.3)
    assert not any(isinstance(l, export.SparseLinear) for l in export.to_sparse(m).modules())
    assert isinstance(export.to_sparse(m, threshold=0.5).layers[0], export.SparseLinear)
    measured = export.to_sparse(_sparse_mlp((256, 512, 10), 0.01), measure_batch=8)
    assert any("measured at batch 8" in n for n in measured.export_notes)
    _same_outputs(m, export.to_sparse(m, threshold=1.0, min_numel=0), torch.randn(5, 256))


def test_to_sparse_leaves_convs_and_says_why():
    fast = export.to_sparse(ConvNet().eval())
    assert isinstance(fast.features[0], nn.Conv2d)
    assert any("conv layer(s) stay dense" in n for n in fast.export_notes)


# -- save_sparse / load_sparse ----------------------------------------------------------------------
def test_save_load_round_trip_bit_exact_and_small(tmp_path):
    m = MLP((64, 200, 80, 10))
    sparsify_(m, 0.03, linear="elementwise", conv=None, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.layers[0].weight[0, :3] = torch.tensor([float("nan"), float("inf"), 1e-45])  # odd values survive
        # −0.0 for about half of the zeros, as the Bregman shrink writes them
        for layer in [mod for mod in m.modules() if isinstance(mod, nn.Linear)]:
            flip = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(2)) < 0.5
            layer.weight[flip] = -layer.weight[flip]
    assert torch.signbit(m.layers[0].weight[m.layers[0].weight == 0]).any()
    path = tmp_path / "m.pt"
    stats = export.save_sparse(m, path, meta={"model": "mlp"})
    state, meta = export.load_sparse(path, with_meta=True)
    assert meta == {"model": "mlp"}
    for k, v in m.state_dict().items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape
        assert torch.equal(state[k].view(torch.int32), v.view(torch.int32)), k  # every bit, a zero's sign too
    dense = io.BytesIO()
    torch.save(m.state_dict(), dense)
    assert dense.tell() >= 5 * stats["bytes"] == 5 * os.path.getsize(path)
    torch.load(path, weights_only=True)  # plain data only


def test_save_sparse_of_convs_batchnorm_and_shrunk_models(tmp_path):
    m = ConvBN().eval()
    _randomize_bn(m)
    _kill(m.features[0], [0, 1], bn=m.features[1], bn_bias=torch.tensor([-3.0, -3.0]))
    small = export.shrink(m, torch.randn(2, 1, 28, 28))
    export.save_sparse(small, tmp_path / "s.pt")
    state = export.load_sparse(tmp_path / "s.pt")
    fresh = export.resize_like(ConvBN(), state)
    fresh.load_state_dict(state)
    _same_outputs(m, fresh, torch.randn(2, 1, 28, 28))
    fast = export.to_sparse(_sparse_mlp())
    export.save_sparse(fast, tmp_path / "f.pt")  # CSR weights are stored like dense ones
    dense = _sparse_mlp()
    dense.load_state_dict(export.load_sparse(tmp_path / "f.pt"))
    _same_outputs(fast, dense, torch.randn(3, 256))


# -- report and bad input ---------------------------------------------------------------------------
def test_report_dense_model_says_nothing_to_gain():
    r = export.report(MLP().eval())
    assert r.nothing_to_gain and "nothing to gain" in str(r)


def test_report_lists_density_dead_units_format_and_macs():
    m = _sparse_mlp()
    _kill(m.layers[0], slice(0, 7))
    r = export.report(m)
    row = r.rows[0]
    assert row["dead"] >= 7 and row["format"] == "csr (to_sparse)" and row["macs_dense"] == 256 * 512
    assert not r.nothing_to_gain
    conv = export.report(ConvNet().eval(), torch.randn(1, 1, 28, 28)).rows[0]
    assert conv["macs_dense"] == 64 * 25 * 24 * 24
    assert "| layers.0 | Linear | 512×256 |" in str(r)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.fc(x)
        return x


def test_untraceable_model_is_named():
    with pytest.raises(export.ExportError, match="Untraceable.*torch.fx"):
        export.shrink(Untraceable().eval(), torch.randn(2, 4))
    assert isinstance(export.to_sparse(Untraceable().eval()), Untraceable)  # needs no tracing


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.norm(F.relu(self.fc1(x))))


def test_unsupported_layer_is_left_as_it_is_with_a_note():
    m = WithLayerNorm().eval()
    _kill(m.fc1, [0, 1])
    x = torch.randn(4, 8)
    small = export.shrink(m, x)
    assert small.fc1.out_features == 16
    _same_outputs(m, small, x)
    assert any("norm (LayerNorm) is not supported by shrink" in n for n in small.export_notes)


def test_train_mode_is_exported_in_eval_mode_with_a_warning():
    m = ConvBN().train()
    with pytest.warns(UserWarning, match="BatchNorm statistics frozen"):
        small = export.shrink(m, torch.randn(2, 1, 28, 28))
    assert not small.training and m.training
    assert "BatchNorm statistics frozen" in str(export.report(m))
    with pytest.warns(UserWarning, match="eval mode"):
        assert not export.to_sparse(m).training


def test_bad_arguments_get_clear_errors(tmp_path):
    with pytest.raises(export.ExportError, match="example_inputs"):
        export.shrink(MLP(), [1, 2])
    with pytest.raises(export.ExportError, match="threshold"):
        export.to_sparse(MLP(), threshold=2.0)
    with pytest.raises(export.ExportError, match="no sparse checkpoint"):
        export.load_sparse(tmp_path / "missing.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(export.ExportError, match="save_sparse"):
        export.load_sparse(tmp_path / "plain.pt")


# -- command line -----------------------------------------------------------------------------------
def test_train_export_and_cli(tmp_path, capsys):
    from bregman_fused.export.cli import main as export_main
    from bregman_fused.train import parse_args, train

    run = tmp_path / "run"
    train(parse_args(["--epochs", "3", "--out-dir", str(run), "--export", "--quiet", "--no-plot",
                      "--backend", "reference", "--device", "cpu"]))
    files = sorted(os.listdir(run / "export"))
    assert files == ["report.txt", "shrunk.pt", "sparse.pt"]
    text = (run / "export" / "report.txt").read_text()
    assert "## shrink + to_sparse" in text and "layers.0" in text
    model = MLP((64, 200, 80, 10))
    model.load_state_dict(export.load_sparse(run / "export" / "sparse.pt"))
    assert export_main([str(run), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--export needs --out-dir"):
        train(parse_args(["--epochs", "1", "--export", "--quiet"]))
