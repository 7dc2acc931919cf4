"""The reference against itself in float64: validates the table and the tolerance machinery, and
checks that each config actually changes θ (a table whose runs do nothing could not catch a bug)."""
import pytest
import torch

from configs import CONFIGS, assert_matches_reference, inputs, run


@pytest.mark.parametrize("cfg", CONFIGS[::7], ids=lambda c: c.id)
def test_reference_table_runs(cfg):
    assert_matches_reference(cfg, "reference")
    theta, _, _ = run(cfg, "reference")
    theta0, _ = inputs(cfg)
    if theta0.numel():
        assert not torch.equal(theta, theta0), "the config leaves θ unchanged"
