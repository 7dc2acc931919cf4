"""Sparse initialisation: exact group counts, Bernoulli densities, forward variance, reproducibility."""
import math

import pytest
import torch
from torch import nn

from bregman_fused import init as sinit
from bregman_fused import metrics


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _nonzero_kernels(w):
    return int((w.reshape(w.shape[0] * w.shape[1], -1) != 0).any(dim=1).sum())


@pytest.mark.parametrize("density", [0.01, 0.05, 0.5])
def test_kernel_mask_has_exact_count_for_every_seed(density):
    conv = nn.Conv2d(64, 32, 5)
    n = 64 * 32
    want = math.ceil(n * density)
    for seed in range(25):
        # drawing indices with replacement (randint) loses a kernel to a duplicate in ~10 % of these
        # draws at density 0.01, and in every draw at 0.5: each of the 25 must hit the count exactly
        sinit.sparse_weight_(conv.weight, density, "kernel", generator=_gen(seed))
        assert _nonzero_kernels(conv.weight) == want
        # a kept kernel is kept whole (its kh·kw Gaussian entries are non-zero)
        assert int(torch.count_nonzero(conv.weight)) == want * 25


def test_exact_count_rounding_and_bounds():
    assert sinit.exact_count(100, 0.07) == 7  # 0.07*100 = 7.000000000000001 must not become 8
    assert sinit.exact_count(10, 0.01) == 1  # at least one group when density > 0
    assert sinit.exact_count(10, 0.0) == 0
    assert sinit.exact_count(10, 1.0) == 10
    with pytest.raises(ValueError, match="density"):
        sinit.exact_count(10, 1.5)


def test_row_mask_keeps_exact_number_of_whole_rows():
    lin = nn.Linear(30, 200)
    sinit.sparse_weight_(lin.weight, 0.1, "row", generator=_gen(3))
    rows = (lin.weight != 0).any(dim=1)
    assert int(rows.sum()) == 20
    assert bool((lin.weight[rows] != 0).all())  # whole rows


@pytest.mark.parametrize("density", [0.01, 0.05, 0.3])
def test_elementwise_density_within_binomial_bounds(density):
    n = 1000 * 500
    for seed in range(3):
        mask = sinit.sparse_mask((1000, 500), density, "elementwise", generator=_gen(seed))
        sd = math.sqrt(n * density * (1 - density))
        assert abs(int(mask.sum()) - n * density) < 5 * sd  # 5 sigma: fails for a wrong density, not by chance


def _forward_mean_square(layer, x):
    with torch.no_grad():
        return float((layer(x) ** 2).mean())


def test_sparse_linear_keeps_dense_forward_variance():
    torch.manual_seed(0)
    x = torch.randn(256, 4096)
    lin = nn.Linear(4096, 1024, bias=False)
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu", generator=_gen(1))
    dense = _forward_mean_square(lin, x)
    assert dense == pytest.approx(2.0, rel=0.05)  # E[(Wx)^2] = gain^2 * E[x^2] = 2
    sinit.sparse_weight_(lin.weight, 0.05, "elementwise", generator=_gen(2))
    assert metrics.tensor_density(lin.weight) == pytest.approx(0.05, rel=0.05)
    assert _forward_mean_square(lin, x) == pytest.approx(dense, rel=0.08)
    # without the 1/sqrt(r) factor the output variance drops by the density: the check can fail
    sinit.sparse_weight_(lin.weight, 0.05, "elementwise", scale=1.0, generator=_gen(2))
    assert _forward_mean_square(lin, x) == pytest.approx(0.05 * dense, rel=0.1)


def test_sparse_conv_kernels_keep_dense_forward_variance():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16)
    conv = nn.Conv2d(64, 64, 3, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=_gen(1))
    dense = _forward_mean_square(conv, x)
    sinit.sparse_weight_(conv.weight, 0.1, "kernel", generator=_gen(2))
    assert _nonzero_kernels(conv.weight) == math.ceil(0.1 * 64 * 64)
    assert _forward_mean_square(conv, x) == pytest.approx(dense, rel=0.1)


def test_explicit_scale_is_factor_on_kaiming_std():
    lin = nn.Linear(400, 300)
    sinit.sparse_weight_(lin.weight, 0.5, scale=7.0, generator=_gen(0))
    nz = lin.weight[lin.weight != 0]
    assert float(nz.detach().std()) == pytest.approx(7.0 * math.sqrt(2.0 / 400), rel=0.05)


def _model():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 50), nn.ReLU(),
                         nn.Linear(50, 10))


def test_sparsify_is_reproducible_with_a_generator():
    a, b, c = _model(), _model(), _model()
    masks_a = sinit.sparsify_(a, 0.1, generator=_gen(7))
    sinit.sparsify_(b, 0.1, generator=_gen(7))
    sinit.sparsify_(c, 0.1, generator=_gen(8))
    assert set(masks_a) == {"0", "3", "5"}
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_sparsify_modes_and_bias_init():
    model = _model()
    before = model[3].weight.detach().clone()
    sinit.sparsify_(model, 0.25, linear=None, conv="kernel", bias=(0.0, 1.0), generator=_gen(0))
    assert torch.equal(model[3].weight, before)  # linear=None leaves linear layers alone
    assert _nonzero_kernels(model[0].weight) == 2  # ceil(0.25 * 8)
    b = model[0].bias
    assert bool((b >= 0).all()) and bool((b < 1 / 3).all())  # U(0, 1/sqrt(fan_in)), fan_in = 9
    sinit.sparsify_(model, 0.25, linear="row", conv=None, bias=None, generator=_gen(0))
    assert metrics.node_densities(model)["3"] == pytest.approx(13 / 50)  # ceil(12.5)
    with pytest.raises(ValueError, match="mode"):
        sinit.sparsify_(model, 0.1, linear="kernel")  # a Linear weight has no kernels
    with pytest.raises(ValueError, match="mode"):
        sinit.sparsify_(model, 0.1, conv="columns")
    with pytest.raises(ValueError, match="density"):
        sinit.sparsify_(model, -0.1)


class _Tied(nn.Module):
    def __init__(self, n=200):
        super().__init__()
        self.a, self.b = nn.Linear(n, n), nn.Linear(n, n)
        self.b.weight = self.a.weight


@pytest.mark.parametrize("reinit", [True, False])
def test_a_tied_weight_is_sparsified_once(reinit):
    # masked twice it would keep ~density² of its rows, and a mask would not match the weight
    m = _Tied()
    masks = sinit.sparsify_(m, 0.1, linear="row", reinit=reinit, generator=torch.Generator().manual_seed(0))
    assert int((m.a.weight != 0).any(1).sum()) == 20  # exactly ceil(0.1 · 200) rows
    assert torch.equal(masks["a"], m.a.weight != 0) and torch.equal(masks["b"], m.a.weight != 0)


def test_density_counts_a_tied_weight_once():
    m = _Tied(100)
    m.c = nn.Linear(100, 100, bias=False)
    with torch.no_grad():
        m.a.weight.zero_()
        m.a.weight[:10] = 1.0
        m.c.weight.fill_(1.0)
    assert metrics.linear_density(m) == pytest.approx(11000 / 20000)  # over unique weights, as opt.density()
    assert metrics.node_density(m) == pytest.approx(110 / 200)
    assert set(metrics.layer_densities(m)) == {"a", "b", "c"}  # per layer: every layer listed
