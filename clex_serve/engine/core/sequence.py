"""A sequence being generated: its tokens, its place in the KV cache, and the scale its cached keys carry."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clex_serve.sampling_params import SamplingParams

if TYPE_CHECKING:  # the core holds a seeded request's generator for the worker, without importing torch
    import torch

    from clex_serve.engine.structured.grammar import SequenceGrammar


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n outputs
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    status: SequenceStatus = SequenceStatus.WAITING
    # KV cache state: the block manager owns the blocks, the runner fills them.
    block_table: list[int] = field(default_factory=list)
    # The table as [first_block, count] stretches of consecutive blocks, kept by the block manager as the
    # table changes (for attention that reads the cache run by run).
    block_runs: list[list[int]] = field(default_factory=list)
    num_cached_tokens: int = 0
    cache_scale: int = 1
    # Output state
    output_text: str = ""
    output_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    grammar: SequenceGrammar | None = None  # structured outputs: what the next token may be
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens
