"""What generation returns, in vLLM's shape: a ``RequestOutput`` holding one ``CompletionOutput`` per sample.

An output carries what its request's ``output_kind`` asks for: everything so far (cumulative), only what
is new since the previous output (delta), or everything once, at the end (final only). Deltas merge:
``merge_outputs`` folds a newer delta into an older one, so a consumer that falls behind receives one
output that holds everything it missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clex_serve.engine.core.sequence import Logprob
from clex_serve.sampling_params import RequestOutputKind


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Times (``time.monotonic``) and counts of one request, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # Seconds between consecutive tokens added since the previous output of this request.
    inter_token_times: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One output equivalent to receiving ``older`` then ``newer``: deltas concatenate (into ``older``, which
    the caller owns and has not handed out), other kinds are replaced by the newer output."""
    if newer.kind is not RequestOutputKind.DELTA:
        return newer
    by_index = {completion.index: completion for completion in older.outputs}
    for completion in newer.outputs:
        before = by_index.get(completion.index)
        if before is None:
            older.outputs.append(completion)
            continue
        before.text += completion.text
        before.token_ids.extend(completion.token_ids)
        if completion.logprobs is not None:
            if before.logprobs is None:
                before.logprobs = []
            before.logprobs.extend(completion.logprobs)
        before.cumulative_logprob = completion.cumulative_logprob
        before.finish_reason, before.stop_reason = completion.finish_reason, completion.stop_reason
    older.outputs.sort(key=lambda completion: completion.index)
    if newer.metrics is not None:
        if older.metrics is not None:
            older.metrics.inter_token_times.extend(newer.metrics.inter_token_times)
            newer.metrics.inter_token_times = older.metrics.inter_token_times
        older.metrics = newer.metrics
    older.prompt_logprobs = older.prompt_logprobs or newer.prompt_logprobs
    older.finished = newer.finished
    return older
