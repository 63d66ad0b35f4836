from clex_serve.layers.rotary.base import RotaryEmbedding, apply_rotary
from clex_serve.layers.rotary.clex import ClexRotaryEmbedding
from clex_serve.layers.rotary.factory import get_rope

__all__ = ["RotaryEmbedding", "ClexRotaryEmbedding", "apply_rotary", "get_rope"]
