"""Decode runs: a step of nothing but decodes that sample alone runs several steps ahead in one go.

Between two decode steps the engine's Python plans the step, packs its tensors, samples, and takes the
token in. On the CPU, with the benchmark's small model, that was 0.55-0.65 ms of a 3.85 ms bfloat16 step
of one stream, and it runs cold, after the step's weights have streamed through the caches. A sequence
that is greedy, or samples at a temperature with nothing else (no top-k/p, penalties, bias, grammar or
logprobs: ``samples_alone``), needs nothing between its steps but the model and the sampler's uniform
numbers, so when a step is only such decodes the scheduler plans ``run_steps`` of them at once and the
worker runs them in one call (the CPU's fused ``llama_decode_run``, with the uniforms drawn ahead in the
sampler's order; elsewhere the steps one by one through the sampler), as vLLM's multi-step scheduling
did. Every token is the one its step alone would have picked: a seeded request samples the same tokens.

Bounds. A run stops where a sequence's scale would change: every step rotates at the scale planned for the
first, as the positions of a verify chunk do (``draft_limit``); the next step re-rotates the cache first.
It stops at a sequence's ``max_tokens`` and the model's length, and its rows times steps stay within
``MAX_RUN_TOKENS``, so that a request arriving during a run waits for about that many decoded tokens'
work at most. A step with prompt work, a preemption or speculation runs one step as before. Tokens after
a stop (EOS, a stop token or string) are computed and dropped, at most ``run_steps - 1`` a sequence; its
stream receives its tokens in groups of up to ``run_steps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from clex_serve.engine.core.block_manager import BlockManager
from clex_serve.engine.core.verify_planning import draft_limit

if TYPE_CHECKING:
    from clex_serve.engine.core.sequence import Sequence
    from clex_serve.engine.core.step_plan import ScheduledChunk

# Rows x steps of a run: 8 steps up to 16 rows, 4 at 32, 2 at 64. 16 float32 streams of the benchmark model,
# one engine alternating, median of four: 909 output tok/s with every step alone, 1,003 at 64 (4 steps a
# run), 1,040 at 128 (8 steps, about 0.1 s, which is the most an arrival then waits for its prompt step).
MAX_RUN_TOKENS = 128


def samples_alone(seq: Sequence) -> bool:
    """Every next token of ``seq`` is the argmax of the model's own logits, or a sample of them at a
    temperature: nothing truncates, penalises, biases or masks them, no logprobs are reported and
    ``min_tokens`` is met (EOS may end it), so nothing but the uniform numbers the sampler draws comes between
    two steps. Stops need no check: a run's tokens after one are dropped."""
    params = seq.params
    return (
        (params.greedy or not params.truncates)
        and params.logprobs is None
        and not params.has_penalties
        and not params.logit_bias
        and seq.grammar is None
        and seq.num_output_tokens >= params.min_tokens
    )


def plan_decode_run(
    decodes: list[ScheduledChunk],
    block_manager: BlockManager,
    scale_for_length: Callable[[int], int],
    max_steps: int,
    max_model_len: int | None,
) -> int:
    """How many steps the planned decodes run in one go (1: a step as usual). Above 1, their blocks for the
    run's positions are taken and each chunk's ``end`` counts the steps after its first."""
    if max_steps < 2 or not decodes or not all(samples_alone(chunk.seq) for chunk in decodes):
        return 1
    steps = min(max_steps, MAX_RUN_TOKENS // len(decodes))
    for chunk in decodes:
        seq = chunk.seq
        room = steps - 1
        if seq.params.max_tokens is not None:  # the run yields up to `steps` tokens
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        steps = 1 + draft_limit(len(seq), room, scale_for_length, max_model_len)
        if steps < 2:
            return 1
    extra_blocks = sum(block_manager.blocks_for(len(c.seq) + steps - 1) - len(c.seq.block_table) for c in decodes)
    if extra_blocks > block_manager.num_free_blocks:
        return 1
    for chunk in decodes:
        block_manager.append(chunk.seq, len(chunk.seq) + steps - 1)
        chunk.end += steps - 1
    return steps
