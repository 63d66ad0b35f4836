"""The worker: everything of a step that touches the device, behind one call.

``execute(plan)`` takes the scheduler's plan and returns a ``RunnerOutput``: the tokens it sampled and
the prompt logprobs asked for, as plain Python values. Inside: the block copies the plan reserved, the
forward pass (the model runner: KV pool, re-rotation of cached keys, CUDA graphs), the prompt logprobs in
row pieces, and sampling with the penalty state that lives on the device. The worker decides nothing of
the plan: every scale, block and token count comes from the scheduler, which alone updates its state from
the output (``Scheduler.update_from_output``).

The output is keyed by sequence and holds a list of tokens per sequence: one today; a verify step of
speculative decoding accepts several, and a token mask of structured outputs narrows what each may be,
without a change to this contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clex_serve.engine.core.scheduler import ScheduledChunk, SchedulerOutput
from clex_serve.engine.core.sequence import Logprob, Sequence
from clex_serve.engine.spec_decode.verifier import DraftVerifier
from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep
from clex_serve.engine.worker.sampler import SampledToken, Sampler, token_logprobs

# Rows of prompt logits materialised at once when computing prompt logprobs: [tokens, vocab] logits of a
# long prompt do not fit in memory at once.
_PROMPT_LOGPROB_ROWS = 256


@dataclass
class RunnerOutput:
    # seq_id -> the tokens sampled for it this step, in order (sequences whose chunk stops short of their
    # end sample nothing).
    sampled: dict[int, list[SampledToken]] = field(default_factory=dict)
    # seq_id -> logprobs of the prompt tokens this chunk predicts (positions start + 1 onwards).
    prompt_logprobs: dict[int, list[dict[int, Logprob]]] = field(default_factory=dict)


class Worker:
    def __init__(self, runner: ModelRunner, sampler: Sampler, eos_token_ids: list[int]) -> None:
        self.runner = runner
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.verifier = DraftVerifier(sampler, eos_token_ids)

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        chunks = plan.chunks
        self.runner.copy_blocks(plan.block_copies)
        if plan.run_steps > 1:
            return self._execute_decode_run(plan)
        rows = [row for row, chunk in enumerate(chunks) if chunk.samples and not chunk.draft_token_ids]
        self.sampler.token_masks.fill_ahead([chunks[row].seq for row in rows])  # beside the forward pass
        result = self.runner.execute([self._sequence_step(chunk) for chunk in chunks])
        output = RunnerOutput()
        for row, hidden in result.all_hidden.items():
            chunk = chunks[row]
            output.prompt_logprobs[chunk.seq.seq_id] = self._prompt_logprobs(chunk, hidden)
        for row, logits in result.row_logits.items():  # verify chunks: their rows' logits pick their tokens
            chunk = chunks[row]
            output.sampled[chunk.seq.seq_id] = self.verifier.verify(logits, chunk.seq, chunk.draft_token_ids)
        if rows:
            logits = result.last_logits
            if len(rows) < logits.shape[0]:  # a prompt chunk short of its end samples nothing
                logits = logits[rows]
            seqs = [chunks[row].seq for row in rows]
            for seq, token in zip(seqs, self.sampler.sample(logits, seqs, self.eos_token_ids)):
                output.sampled[seq.seq_id] = [token]
        return output

    def _execute_decode_run(self, plan: SchedulerOutput) -> RunnerOutput:
        """A plan of decodes run ``plan.run_steps`` steps ahead in one go (``decode_runs``): every sequence's
        tokens, as the sampler would have picked them step by step."""
        chunks = plan.decodes
        seqs = [chunk.seq for chunk in chunks]
        steps = [self._sequence_step(chunk) for chunk in chunks]
        if self._fuses(steps, seqs):
            sampling = self.sampler.run_sampling(seqs, plan.run_steps)
            tokens = self.runner.decode_run(steps, plan.run_steps, sampling=sampling)
        else:

            def pick(logits: torch.Tensor) -> list[int]:
                return [token.token_id for token in self.sampler.sample(logits, seqs, self.eos_token_ids)]

            tokens = self.runner.decode_run(steps, plan.run_steps, pick)
        output = RunnerOutput()
        for chunk, row in zip(chunks, tokens):
            output.sampled[chunk.seq.seq_id] = [SampledToken(token, None) for token in row]
        return output

    def _fuses(self, steps: list[SequenceStep], seqs: list[Sequence]) -> bool:
        """The run goes to the fused call, which samples as the sampler's C++ kernel does."""
        return self.runner.fuses_decode_runs(steps) and (
            self.sampler.cpu_kernels or all(seq.params.greedy for seq in seqs)
        )

    def release(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves the device-side state (penalty tables)."""
        self.sampler.release(seq)

    @staticmethod
    def wants_prompt_logprobs(chunk: ScheduledChunk) -> bool:
        """Prompt logprobs are computed once per request (by its first sample), on its first prompt pass."""
        seq = chunk.seq
        return (
            chunk.is_prompt_pass
            and seq.params.prompt_logprobs is not None
            and seq.index == 0
            and seq.num_output_tokens == 0
        )

    def _sequence_step(self, chunk: ScheduledChunk) -> SequenceStep:
        """The runner's view of a planned chunk."""
        seq = chunk.seq
        return SequenceStep(
            token_ids=chunk.token_ids,
            num_cached=chunk.start,
            block_table=seq.block_table,
            block_runs=seq.block_runs,
            cache_scale=chunk.rescale_from or chunk.scale,
            scale=chunk.scale,
            all_logits=self.wants_prompt_logprobs(chunk),
            scale_len=chunk.scale_len,
            per_token_scale=chunk.per_token_scale,
            decode_rows=bool(chunk.draft_token_ids),
        )

    def _prompt_logprobs(self, chunk: ScheduledChunk, hidden: torch.Tensor) -> list[dict[int, Logprob]]:
        """Logprob of each prompt token given the tokens before it, for the chunk's positions; in row pieces
        so that a long prompt never materialises [tokens, vocab] logits at once."""
        seq = chunk.seq
        rows = min(hidden.shape[0], seq.num_prompt_tokens - 1 - chunk.start)  # the last prompt row predicts output
        entries = []
        for offset in range(0, rows, _PROMPT_LOGPROB_ROWS):
            end = min(offset + _PROMPT_LOGPROB_ROWS, rows)
            logprobs = torch.log_softmax(self.runner.model.compute_logits(hidden[offset:end]).float(), dim=-1).cpu()
            for row in range(end - offset):
                target = seq.token_ids[chunk.start + offset + row + 1]
                entries.append(token_logprobs(logprobs[row], target, seq.params.prompt_logprobs))
        return entries
