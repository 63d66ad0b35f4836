"""After a step: each new token's logprobs, timing and text, stop strings, and the outputs a request asked for.

Per step the work is proportional to what is new: a token is appended, its text decoded from a short
window, the stop strings searched in the new text's neighbourhood, and a delta output sliced from the
offsets already handed out. Cumulative outputs copy what was generated so far, as their kind says; a
final-only request costs nothing until it finishes.
"""

from __future__ import annotations

import dataclasses
import time

from clex_serve.engine.core.request import Request
from clex_serve.engine.core.sequence import Logprob, Sequence
from clex_serve.engine.outputs import CompletionOutput, RequestOutput
from clex_serve.engine.worker.sampler import SampledToken
from clex_serve.sampling_params import RequestOutputKind
from clex_serve.text.stop_checker import find_stop_string, visible_length


class OutputProcessor:
    def append_tokens(self, request: Request, seq: Sequence, tokens: list[SampledToken], now: float) -> None:
        """Take the tokens the scheduler just appended to ``seq``: their logprobs, the request's timing, the
        detokenized text, and the stop strings it may now contain (which end the sequence there)."""
        for position, token in enumerate(tokens):
            if token.logprobs is not None:
                seq.output_logprobs.append(token.logprobs)
                seq.cumulative_logprob += token.logprobs[token.token_id].logprob
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            elif metrics.last_token_time is not None:
                request.pending_inter_token_times.append(now - metrics.last_token_time)
            metrics.last_token_time = now
            metrics.num_generation_tokens += 1
            detokenizer = request.detokenizers[seq.index]
            new_text = detokenizer.add(token.token_id)
            seq.output_text += new_text
            if new_text:  # a stop string also overrides a token's stop (max_tokens reached on it)
                # Several tokens arrive at once from a verify step of speculative decoding: this one's count.
                later = len(tokens) - 1 - position
                found = find_stop_string(seq.params, seq.output_text, len(new_text), seq.num_output_tokens - later)
                if found is not None:
                    end, stop = found
                    seq.output_text = seq.output_text[:end]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    if later:  # the tokens after the stop string are not part of the output
                        del seq.token_ids[-later:]
                    break
        if seq.finish_reason is not None and not isinstance(seq.stop_reason, str):
            # Finished by a token, not by a stop string: show what the detokenizer still held back (a
            # character whose bytes never completed decodes to U+FFFD, as a full decode would give).
            seq.output_text += request.detokenizers[seq.index].flush()

    @staticmethod
    def add_prompt_logprobs(request: Request, start: int, entries: list[dict[int, Logprob]]) -> None:
        """The logprobs of a prompt chunk starting at ``start`` (the first prompt token has none)."""
        if start == 0:
            request.prompt_logprobs = [None]
        request.prompt_logprobs.extend(entries)

    def make_output(self, request: Request) -> RequestOutput | None:
        """The output the request's kind asks for now; None for a final-only request still running."""
        kind = request.params.output_kind
        finished = request.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if finished and request.metrics.finished_time is None:
            request.metrics.finished_time = time.monotonic()
        delta = kind is RequestOutputKind.DELTA
        completions = [
            self._completion(seq, request.sent[seq.index], request.params.logprobs is not None, delta)
            for seq in request.seqs
        ]
        prompt_logprobs = request.prompt_logprobs
        if delta:
            prompt_logprobs = None if request.prompt_logprobs_sent else request.prompt_logprobs
            request.prompt_logprobs_sent = request.prompt_logprobs is not None
        metrics = dataclasses.replace(request.metrics, inter_token_times=request.pending_inter_token_times)
        request.pending_inter_token_times = []
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            prompt_logprobs,
            completions,
            finished,
            metrics,
            kind,
        )

    @staticmethod
    def _completion(seq: Sequence, sent, with_logprobs: bool, delta: bool) -> CompletionOutput:
        visible = visible_length(seq.params, seq.output_text, seq.finish_reason is not None)
        first_token = seq.num_prompt_tokens + (sent.tokens if delta else 0)
        token_ids = seq.token_ids[first_token:]
        text = seq.output_text[sent.text if delta else 0 : visible]
        logprobs = None
        if with_logprobs:
            logprobs = seq.output_logprobs[sent.logprobs :] if delta else list(seq.output_logprobs)
        if delta:
            sent.tokens, sent.text, sent.logprobs = seq.num_output_tokens, visible, len(seq.output_logprobs)
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=seq.cumulative_logprob if with_logprobs else None,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
