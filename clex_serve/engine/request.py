"""A request in flight: its sequences (n samples), their detokenizers, and the outputs it reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from clex_serve.text.detokenizer import IncrementalDetokenizer
from clex_serve.engine.outputs import CompletionOutput, RequestOutput
from clex_serve.engine.sequence import Logprob, Sequence
from clex_serve.text.stop_checker import visible_text
from clex_serve.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def to_output(self) -> RequestOutput:
        completions = []
        for seq in self.seqs:
            finished = seq.finish_reason is not None
            completions.append(CompletionOutput(
                index=seq.index,
                text=seq.output_text if finished else visible_text(seq),
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if self.params.logprobs is not None else None,
                logprobs=list(seq.output_logprobs) if self.params.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            ))
        metrics = {"arrival": self.arrival, "first_token": self.first_token_time}
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.prompt_logprobs,
                             completions, self.finished, metrics)
