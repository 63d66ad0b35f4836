"""After sampling: append each token, detokenize, check stops, and build the outputs a request asked for.

Per step the work is proportional to what is new: a token is appended, its text decoded from a short
window, the stop strings searched in the new text's neighbourhood, and a delta output sliced from the
offsets already handed out. Cumulative outputs copy what was generated so far, as their kind says; a
final-only request costs nothing until it finishes.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from clex_serve.engine.outputs import CompletionOutput, RequestOutput
from clex_serve.engine.request import Request
from clex_serve.engine.sampler import token_logprobs
from clex_serve.engine.sequence import Logprob, Sequence
from clex_serve.sampling_params import RequestOutputKind
from clex_serve.text.stop_checker import check_stop_strings, check_stop_tokens, visible_length

# Rows of prompt logits materialised at once when computing prompt logprobs.
_PROMPT_LOGPROB_ROWS = 256


class OutputProcessor:
    def __init__(self, eos_token_ids: list[int], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def append_token(self, request: Request, seq: Sequence, token_id: int, logprobs: dict[int, Logprob] | None,
                     now: float) -> None:
        seq.token_ids.append(token_id)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id].logprob
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        elif metrics.last_token_time is not None:
            request.pending_inter_token_times.append(now - metrics.last_token_time)
        metrics.last_token_time = now
        metrics.num_generation_tokens += 1

        check_stop_tokens(seq, token_id, self.eos_token_ids, self.max_model_len)
        detokenizer = request.detokenizers[seq.index]
        new_text = detokenizer.add(token_id)
        seq.output_text += new_text
        if new_text:
            check_stop_strings(seq, len(new_text))
        if seq.finish_reason is not None and not isinstance(seq.stop_reason, str):
            # Finished by a token, not by a stop string: show what the detokenizer still held back (a
            # character whose bytes never completed decodes to U+FFFD, as a full decode would give).
            seq.output_text += detokenizer.flush()

    def add_prompt_logprobs(self, request: Request, seq: Sequence, start: int, hidden: torch.Tensor,
                            compute_logits) -> None:
        """Logprob of each prompt token given the tokens before it, for a prompt chunk starting at ``start``;
        in row pieces so that a long prompt never materialises [tokens, vocab] logits at once."""
        if start == 0:
            request.prompt_logprobs = [None]  # the first prompt token has no context
        rows = min(hidden.shape[0], seq.num_prompt_tokens - 1 - start)  # the last prompt row predicts output
        for offset in range(0, rows, _PROMPT_LOGPROB_ROWS):
            end = min(offset + _PROMPT_LOGPROB_ROWS, rows)
            logprobs = torch.log_softmax(compute_logits(hidden[offset:end]).float(), dim=-1).cpu()
            for row in range(end - offset):
                target = seq.token_ids[start + offset + row + 1]
                request.prompt_logprobs.append(token_logprobs(logprobs[row], target, seq.params.prompt_logprobs))

    def make_output(self, request: Request) -> RequestOutput | None:
        """The output the request's kind asks for now; None for a final-only request still running."""
        kind = request.params.output_kind
        finished = request.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if finished and request.metrics.finished_time is None:
            request.metrics.finished_time = time.monotonic()
        delta = kind is RequestOutputKind.DELTA
        completions = [self._completion(seq, request.sent[seq.index], request.params.logprobs is not None, delta)
                       for seq in request.seqs]
        prompt_logprobs = request.prompt_logprobs
        if delta:
            prompt_logprobs = None if request.prompt_logprobs_sent else request.prompt_logprobs
            request.prompt_logprobs_sent = request.prompt_logprobs is not None
        metrics = dataclasses.replace(request.metrics, inter_token_times=request.pending_inter_token_times)
        request.pending_inter_token_times = []
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, prompt_logprobs,
                             completions, finished, metrics, kind)

    @staticmethod
    def _completion(seq: Sequence, sent, with_logprobs: bool, delta: bool) -> CompletionOutput:
        visible = visible_length(seq)
        first_token = seq.num_prompt_tokens + (sent.tokens if delta else 0)
        token_ids = seq.token_ids[first_token:]
        text = seq.output_text[sent.text if delta else 0:visible]
        logprobs = None
        if with_logprobs:
            logprobs = seq.output_logprobs[sent.logprobs:] if delta else list(seq.output_logprobs)
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
