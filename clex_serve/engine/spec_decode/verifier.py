"""Verifying drafts: from the logits of a verify chunk, the tokens the sequence keeps.

Row ``j`` of the logits is the distribution after the sequence's tokens and the first ``j`` drafts. Each row
is turned into a token exactly as the sampler would choose it alone (logit bias, ``min_tokens`` counted
at that row's position, temperature, top-k/p, min-p, then argmax or the inverse CDF at one uniform draw),
and the tokens are kept up to and including the first that differs from its draft; all of them when every
draft matches (the last row's token is then one more).

Greedy, that is the longest matching prefix plus the next token. Sampling, it is rejection sampling for a
deterministic draft: draft ``d`` is kept with probability ``p(d)``, and when it is not, the token drawn
instead comes from ``p`` without ``d``, renormalised (the residual distribution): the output is distributed
as plain sampling, and acceptance is the best possible for a draft of one token. Each kept token consumes one
uniform draw of the sequence's generator, as plain sampling does (the draws of rows after the first
mismatch are given back), so a seeded request samples the same tokens with speculation as without.

A sequence with structured outputs has each row masked by its grammar after the drafts before that row, as
the sampler masks a plain row (last, after the logit bias); its drafts were cut where the grammar rejects
them, so every row's grammar state exists. Penalties are not verified here: such sequences draft nothing
(``drafter``).
"""

from __future__ import annotations

import torch

from clex_serve.engine.core.sequence import Sequence
from clex_serve.engine.worker.sampler import SampledToken, Sampler, _filter, _inverse_cdf, _needs_filter, token_logprobs
from clex_serve.kernels import cpu_ops


class DraftVerifier:
    def __init__(self, sampler: Sampler, eos_token_ids: list[int]) -> None:
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids

    def verify(self, logits: torch.Tensor, seq: Sequence, drafts: list[int]) -> list[SampledToken]:
        """``logits`` [len(drafts) + 1, vocab] float32, raw model output of the chunk's rows."""
        params = seq.params
        chosen, states = self._choose(self._processed(logits, seq, drafts), seq)
        kept = 1
        while kept <= len(drafts) and chosen[kept - 1] == drafts[kept - 1]:
            kept += 1
        if kept < len(states):  # rewind the generator to just after the kept rows' draws
            self._generator(seq).set_state(states[kept])
        raw_logprobs = torch.log_softmax(logits[:kept], dim=-1) if params.logprobs is not None else None
        return [
            SampledToken(
                token_id,
                token_logprobs(raw_logprobs[row], token_id, params.logprobs) if raw_logprobs is not None else None,
            )
            for row, token_id in enumerate(chosen[:kept])
        ]

    def _processed(self, logits: torch.Tensor, seq: Sequence, drafts: list[int]) -> torch.Tensor:
        """Logit bias, the stop tokens masked in rows still short of ``min_tokens``, the grammar's masks."""
        params = seq.params
        # A grammar decides where its output ends: min_tokens does not hold back the stop it allows.
        held_back = (
            0 if seq.grammar is not None else max(0, min(params.min_tokens - seq.num_output_tokens, logits.shape[0]))
        )
        if not params.logit_bias and not held_back and seq.grammar is None:
            return logits
        logits = logits.clone()
        if params.logit_bias:
            token_ids, biases = zip(*params.logit_bias)
            logits[:, list(token_ids)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        stops = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)
        if held_back and stops:
            logits[:held_back, stops] = float("-inf")
        if seq.grammar is not None:
            self.sampler.token_masks.apply_along_draft(logits, seq, drafts)
        return logits

    def _generator(self, seq: Sequence) -> torch.Generator:
        return seq.generator if seq.generator is not None else self.sampler.generator

    def _choose(self, logits: torch.Tensor, seq: Sequence) -> tuple[list[int], list[torch.Tensor]]:
        """Each row's token, chosen as the sampler chooses one (the same kernels, the same uniform draws), and
        the generator's state before each row's draw."""
        sampler = self.sampler
        if seq.params.greedy:
            return sampler.argmax(logits).tolist(), []
        rows = logits.shape[0]
        generator = self._generator(seq)
        states, draws = [], []
        for _ in range(rows):  # one at a time, as the sampler draws a seeded row's number
            states.append(generator.get_state())
            draws.append(torch.rand(1, generator=generator, dtype=torch.float64, device=logits.device))
        uniforms = torch.cat(draws)
        temperatures = torch.full((rows,), seq.params.temperature or 1.0, device=logits.device)
        seqs = [seq] * rows
        if sampler.cpu_kernels and not _needs_filter(seqs) and logits.dtype == torch.float32:
            sampled = cpu_ops.sample_rows(logits.contiguous(), temperatures, uniforms)
        else:
            sampled = _inverse_cdf(_filter(logits / temperatures[:, None], seqs).softmax(dim=-1), uniforms)
        return sampled.tolist(), states
