"""CLEX's training-time sampling of the scale t and of fractional positions (CLEX.md, "Training")."""

import pytest
import torch

from clex_serve.train.positions import draw_scale, fractional_positions


def test_scale_one_single_window_is_contiguous():
    positions = fractional_positions(128, 128, 1, torch.Generator().manual_seed(0))
    assert torch.equal(positions, torch.arange(128, dtype=torch.float32))


@pytest.mark.parametrize("seq_len,base_len,scale", [(128, 128, 8), (64, 16, 3), (32, 16, 16), (10, 20, 5)])
def test_positions_follow_the_official_rule(seq_len, base_len, scale):
    stride = max(seq_len // base_len, 1)
    for seed in range(20):
        positions = fractional_positions(seq_len, base_len, scale, torch.Generator().manual_seed(seed))
        assert positions.shape == (seq_len,)
        assert positions[0] == 0
        assert positions[-1] == seq_len * scale // stride - 1
        inner_q = positions[1:-1] * stride - 1  # recover the drawn q
        assert torch.equal(inner_q, inner_q.round()), "inner positions must be (q + 1) / s"
        assert inner_q.min() >= 0 and inner_q.max() <= seq_len * scale - 3
        assert torch.all(inner_q[1:] > inner_q[:-1]), "q drawn without replacement and sorted"


def test_positions_spread_over_the_scaled_window():
    # At t = 8 the 128 tokens sample a 1024-position window: its far half must be reached.
    positions = fractional_positions(128, 128, 8, torch.Generator().manual_seed(3))
    assert (positions > 512).sum() > 30
    assert positions.max() == 1023


def test_sampling_is_seeded():
    a = fractional_positions(64, 64, 5, torch.Generator().manual_seed(7))
    b = fractional_positions(64, 64, 5, torch.Generator().manual_seed(7))
    c = fractional_positions(64, 64, 5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scales_are_uniform_over_one_to_max_factor():
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(17, dtype=torch.long)
    for _ in range(4800):
        counts[draw_scale(16, generator)] += 1
    assert counts[0] == 0
    assert counts[1:].min() > 200 and counts[1:].max() < 400  # expected 300 each


def test_bad_arguments_are_value_errors():
    generator = torch.Generator()
    with pytest.raises(ValueError):
        fractional_positions(1, 16, 1, generator)
    with pytest.raises(ValueError):
        fractional_positions(16, 16, 0, generator)
    with pytest.raises(ValueError):
        draw_scale(0, generator)
