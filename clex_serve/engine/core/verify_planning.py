"""Verify steps of speculative decoding: how many drafted tokens each decode carries, and taking back the
rejected ones. Plain Python, no tensors; the scheduler calls both.

A decode that verifies ``k`` drafts computes its last token and the drafts in one chunk, positions
``len - 1 .. len + k - 1``, and its logits pick up to ``k + 1`` tokens. Decoded one at a time, each of those
positions would be a pass of its own, rotated with the scale of the length it leaves, and under CLEX a
pass that crosses a multiple of the base window changes the scale every cached key is rotated with. So
the drafts stop where the scale would change: then every position of the chunk has the scale it would
have had alone, and its log scale (``per_token_scale``) is that of its own length. The drafts beyond the
boundary wait for the next step, which re-rotates the cache first. Drafts are optional: they take only
the blocks that are free and the budget the plain decodes leave, never another sequence's turn.

After the step the sequence keeps what was accepted: its cached count drops by the rejected drafts, and
blocks that only held them go back. Rejected tokens never enter ``token_ids``, and the prefix cache only
publishes full prompt blocks, which a verify chunk (positions past the prompt) never writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from clex_serve.engine.core.block_manager import BlockManager

if TYPE_CHECKING:
    from clex_serve.engine.core.step_plan import ScheduledChunk
    from clex_serve.engine.spec_decode.drafter import Drafter


def draft_limit(length: int, room: int, scale_for_length: Callable[[int], int], max_model_len: int | None) -> int:
    """The most drafts a sequence of ``length`` tokens may verify: within ``room``, the model's length, and
    the scale of its next token (every drafted position must run at that scale)."""
    limit = room if max_model_len is None else min(room, max_model_len - length)
    scale = scale_for_length(length)
    drafts = 0
    while drafts < limit and scale_for_length(length + drafts + 1) == scale:
        drafts += 1
    return drafts


def add_drafts(
    decodes: list[ScheduledChunk],
    drafter: Drafter,
    block_manager: BlockManager,
    scale_for_length: Callable[[int], int],
    token_room: int,
    max_model_len: int | None,
) -> None:
    """Give planned decode chunks their drafts, in order, within ``token_room`` tokens and the free blocks.
    Their scale and block copies were planned for the next token and hold for every draft (``draft_limit``)."""
    if not decodes or token_room <= 0 or not drafter.step_allows(len(decodes)):
        return
    for chunk in decodes:
        seq = chunk.seq
        room = min(drafter.max_tokens, token_room)
        if seq.params.max_tokens is not None:  # the step yields up to drafts + 1 tokens
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        drafts = drafter.propose(seq, draft_limit(len(seq), room, scale_for_length, max_model_len))
        if not drafts:
            continue
        extra_blocks = block_manager.blocks_for(len(seq) + len(drafts)) - len(seq.block_table)
        if extra_blocks > block_manager.num_free_blocks:
            continue
        block_manager.append(seq, len(seq) + len(drafts))
        chunk.draft_token_ids = list(drafts)
        chunk.end += len(drafts)
        chunk.per_token_scale = True
        token_room -= len(drafts)
        if token_room <= 0:
            return


def take_verify_result(chunk: ScheduledChunk, num_tokens: int, drafter: Drafter, block_manager: BlockManager) -> None:
    """After a verify chunk yielded ``num_tokens`` tokens (the accepted drafts and one more): the rejected
    drafts leave the cached count, and the blocks past what the sequence now holds go back."""
    seq = chunk.seq
    num_drafted = len(chunk.draft_token_ids)
    num_accepted = num_tokens - 1
    seq.num_cached_tokens = chunk.end - (num_drafted - num_accepted)
    drafter.record(seq, num_drafted, num_accepted)
    block_manager.trim(seq, seq.num_cached_tokens + 1)
