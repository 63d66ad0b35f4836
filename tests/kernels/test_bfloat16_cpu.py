"""bfloat16 on the CPU is safe to offer: the demo model's held-out perplexity in bfloat16 (weights, KV cache and
activations; the CLEX ODE and rotary tables stay float32) is within 1% of float32, at the training length and
far past it, where CLEX's scaled rotations matter."""

import pytest

from clex_serve.assets import DEFAULT_MODEL_PATH
from clex_serve.train import evaluate


@pytest.mark.parametrize("factor", [1, 4, 16])
def test_bfloat16_perplexity_within_one_percent_of_float32(factor):
    base_len = 128
    length = factor * base_len
    tokens = evaluate.held_out_tokens(DEFAULT_MODEL_PATH, 2 * 16 * base_len)
    method = evaluate.Method("CLEX demo", DEFAULT_MODEL_PATH)
    full = evaluate.perplexity(method, tokens, length, base_len, dtype="float32")
    half = evaluate.perplexity(method, tokens, length, base_len, dtype="bfloat16")
    assert 1 < full < 1000  # a trained model on held-out text, not noise
    assert abs(half - full) / full < 0.01, (full, half)
