"""Sequences and a CLEX scale schedule for the tests of the engine core, which need no model."""

from functools import partial

from clex_serve import SamplingParams
from clex_serve.engine.core.sequence import Sequence
from clex_serve.layers.rotary.clex import clex_scale_for_length

# The schedule of a small CLEX model: a base window of 8 tokens, scales up to 4.
clex_scale = partial(clex_scale_for_length, base_window=8, max_factor=4)


def make_sequence(seq_id: int, length: int, params: SamplingParams | None = None) -> Sequence:
    """A sequence with prompt 1..length: prompts share their leading tokens, so prefix caching finds hits."""
    return Sequence(seq_id, f"r{seq_id}", 0, list(range(1, length + 1)), params or SamplingParams())
