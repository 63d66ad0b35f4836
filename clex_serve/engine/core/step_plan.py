"""A step's plan, as the scheduler makes it and the worker executes it: one chunk per sequence (which of
its tokens are computed, at which scale, with which drafts), and the block copies a re-rotation needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from clex_serve.engine.core.sequence import Sequence


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # the first position to compute (the tokens before it are cached)
    end: int  # one past the last position to compute
    scale_len: int | None  # the length whose scale (and log scale) every token uses; None: the chunk's end
    per_token_scale: bool  # log scale per query from its own length (replaying decoded tokens)
    is_prompt_pass: bool
    samples: bool = False  # the chunk reaches the end of the sequence: its last logits pick the next token
    scale: int = 1  # the rotary scale this chunk rotates with (set when the chunk is planned)
    rescale_from: int | None = None  # the scale the cached keys carry, when they must be re-rotated first
    # Speculative decoding: tokens drafted after the sequence's last one, computed in this chunk
    # (``end`` counts them) and verified by its logits (``verify_planning``).
    draft_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.samples = self.end == len(self.seq)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def token_ids(self) -> list[int]:
        """The tokens this chunk computes: the sequence's, then its drafts."""
        return self.seq.token_ids[self.start : self.end] + self.draft_token_ids


@dataclass
class SchedulerOutput:
    # One token for each running sequence that has all but its last token cached (its next token).
    decodes: list[ScheduledChunk]
    # Prompt and recompute chunks, in the budget the decodes left.
    prefills: list[ScheduledChunk]
    preempted: list[Sequence]
    # (source, destination) KV blocks to copy before any re-rotation of this step: copy on write of
    # prefix-shared blocks whose sequence changes scale. Their destinations are already reserved.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # More than 1: the plan is only decodes that sample alone, each run this many steps ahead in one go, every
    # step's picked token the next one's input (``decode_runs``); each decode's ``end`` counts the steps after
    # its first.
    run_steps: int = 1

    @property
    def chunks(self) -> list[ScheduledChunk]:
        """Everything the step runs, one chunk per sequence, decodes first."""
        return self.decodes + self.prefills

    @property
    def num_decode_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.decodes)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.prefills)
