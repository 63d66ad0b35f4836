"""A checkpoint whose CLEX ODE diverges is named at load, not left to produce NaN outputs silently."""

import logging

import torch

from clex_serve.config import ModelConfig
from clex_serve.layers.rotary import get_rope
from helpers.reference import FIXTURES, REFERENCE_MODELS


def rope_with_projection(scale: float):
    config = ModelConfig.from_file(FIXTURES / REFERENCE_MODELS[0] / "config.json")
    rope = get_rope(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (rope.proj_func.ode_up_proj, rope.proj_func.ode_down_proj):
            weight.copy_(torch.randn(weight.shape, generator=generator) * scale)
    return rope


def test_a_diverging_ode_is_warned_about_with_the_length_it_breaks_at(caplog):
    rope = rope_with_projection(10.0)
    with caplog.at_level(logging.WARNING, logger="clex_serve.layers.rotary.clex"):
        rope.finalize()
    broken = (~torch.isfinite(rope.scaled_inv_freq)).any(dim=1).nonzero()
    assert len(broken), "the projection should overflow some scale"
    first = int(broken[0]) + 1
    [record] = caplog.records
    assert f"from scale {first} on" in record.getMessage()
    assert f"past {(first - 1) * rope.max_position_embeddings} tokens" in record.getMessage()


def test_a_sane_ode_loads_without_a_warning(caplog):
    rope = rope_with_projection(0.01)
    with caplog.at_level(logging.WARNING, logger="clex_serve.layers.rotary.clex"):
        rope.finalize()
    assert torch.isfinite(rope.scaled_inv_freq).all()
    assert not caplog.records
