"""A request in flight: its sequences (n samples), their detokenizers, its metrics, and how much of its
output has already been handed out (so that a delta output carries only what is new)."""

from __future__ import annotations

from dataclasses import dataclass, field

from clex_serve.engine.core.sequence import Logprob, Sequence
from clex_serve.engine.outputs import RequestMetrics
from clex_serve.sampling_params import SamplingParams
from clex_serve.text.detokenizer import IncrementalDetokenizer


@dataclass
class SentOffsets:
    """How much of one sequence's output earlier delta outputs carried."""

    tokens: int = 0
    text: int = 0
    logprobs: int = 0


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    sent: list[SentOffsets] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    # Inter-token times not yet carried by an output.
    pending_inter_token_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sent = [SentOffsets() for _ in self.seqs]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)
