"""Metrics on hand-built weights with known densities."""
import pytest
import torch
from torch import nn

from bregman_fused import metrics


def _net():
    net = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
            # biases are not counted: make them non-zero to prove it
        net[0].bias.fill_(1.0)
        net[2].bias.fill_(1.0)
        # linear (3, 4): row 0 has 2 non-zeros, row 2 has 1, row 1 none
        net[2].weight[0, 0] = 1.0
        net[2].weight[0, 3] = -2.0
        net[2].weight[2, 1] = 0.5
        # conv (3, 2, 2, 2): kernel (0, 0) has 1 non-zero, kernel (1, 1) all 4; channel 2 empty
        net[0].weight[0, 0, 1, 1] = 3.0
        net[0].weight[1, 1] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    return net


def test_known_densities():
    net = _net()
    assert metrics.linear_density(net) == pytest.approx(3 / 12)
    assert metrics.conv_kernel_density(net) == pytest.approx(2 / 6)
    assert metrics.density(net) == pytest.approx((3 + 5) / (12 + 24))
    assert metrics.node_density(net) == pytest.approx((2 + 2) / (3 + 3))
    assert metrics.node_densities(net) == pytest.approx({"0": 2 / 3, "2": 2 / 3})
    assert metrics.layer_densities(net) == pytest.approx({"0": 5 / 24, "2": 3 / 12})


def test_tensor_density_single_and_several():
    a = torch.tensor([0.0, 1.0, 0.0, 2.0])
    b = torch.zeros(6)
    assert metrics.tensor_density(a) == 0.5
    assert metrics.tensor_density([a, b]) == pytest.approx(2 / 10)
    assert metrics.tensor_density(torch.ones(3, 3)) == 1.0


def test_negative_zero_and_tiny_values():
    # -0.0 is a zero; a denormal is not
    t = torch.tensor([-0.0, 0.0, 1e-40, -1e-30])
    assert metrics.tensor_density(t) == 0.5


def test_empty_selections_are_zero_not_nan():
    net = nn.Sequential(nn.ReLU())
    assert metrics.density(net) == 0.0
    assert metrics.conv_kernel_density(nn.Sequential(nn.Linear(2, 2))) == 0.0
    assert metrics.layer_densities(net) == {}


def test_dense_model_is_density_one():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.1)
    assert metrics.density(net) == 1.0
    assert metrics.conv_kernel_density(net) == 1.0
    assert metrics.node_density(net) == 1.0
