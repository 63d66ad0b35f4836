"""``get_rope``: the one place that maps a config's ``rope_scaling`` to a rotary embedding class."""

from __future__ import annotations

from clex_serve.config import ModelConfig
from clex_serve.layers.rotary.base import RotaryEmbedding
from clex_serve.layers.rotary.clex import ClexRotaryEmbedding
from clex_serve.layers.rotary.scaled import (
    DynamicNTKRotaryEmbedding,
    LinearScalingRotaryEmbedding,
    Llama3RotaryEmbedding,
    YarnRotaryEmbedding,
)

_SCALED = {
    "clex": ClexRotaryEmbedding,
    "linear": LinearScalingRotaryEmbedding,
    "dynamic": DynamicNTKRotaryEmbedding,
    "yarn": YarnRotaryEmbedding,
    "llama3": Llama3RotaryEmbedding,
}


def get_rope(config: ModelConfig) -> RotaryEmbedding:
    args = (config.rotary_dim, config.rope_theta, config.max_position_embeddings)
    if config.rope_scaling is None:
        return RotaryEmbedding(*args)
    return _SCALED[config.rope_scaling.type](*args, config.rope_scaling)
