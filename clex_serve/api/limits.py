"""Bounds on what one request may ask for, so that every request's work and memory are bounded before it is
admitted. Each is checked where the request is parsed, and written into the OpenAPI description."""

from __future__ import annotations

MAX_N = 128  # completions per prompt: OpenAI's limit
MAX_PROMPTS = 2048  # prompts in one completions request (a batch of lm-evaluation-harness requests fits)
MAX_CHOICES = 2048  # prompts times n: sequences one request may start
MAX_STOP_SEQUENCES = 32  # each is searched for after every token
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_TOP_LOGPROBS = 20  # alternatives per token: OpenAI's limit
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit seed, as torch.Generator takes it

# The body of the longest prompt the model can read is far below this many bytes per token of context:
# text runs 3-5 bytes a token, JSON-escaped non-ASCII text up to about 20, token ids 7.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_BYTES = 1 << 20


def default_max_body_bytes(max_model_len: int) -> int:
    """The request-body limit a server uses unless told otherwise: sized from the longest prompt it can read."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)
