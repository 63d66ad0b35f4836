"""Sampling for a whole batch at once: penalties, logit bias, temperature, top-k, top-p, min-p, seeds, logprobs.

Rows that ask for nothing special cost nothing special: each transformation runs only when some row in the
batch needs it, and then on the whole batch. A seeded request draws its noise from its own generator, so
it samples the same tokens whatever else shares the batch. Penalties read token counts kept on the device
across steps (``penalties.PenaltyState``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clex_serve.engine.core.sequence import Logprob, Sequence
from clex_serve.engine.worker.penalties import PenaltyState
from clex_serve.engine.worker.token_mask import TokenMasks
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_for


@dataclass
class SampledToken:
    token_id: int
    logprobs: dict[int, Logprob] | None  # the sampled token and the top alternatives, when asked


def _needs_filter(seqs: list[Sequence]) -> bool:
    return any(seq.params.truncates for seq in seqs)


@dataclass
class RunSampling:
    """How a fused decode run picks the tokens of a batch that samples (``Sampler.run_sampling``)."""

    temperatures: torch.Tensor  # [B] float32, 1.0 for greedy rows (as ``sample`` passes them)
    uniforms: torch.Tensor  # [steps, B] float64: row j is what step j alone would have drawn
    greedy_rows: torch.Tensor | None  # [B] bool: the rows that take the argmax; None: no such row


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """top-k, top-p and min-p on temperature-scaled logits; filtered entries become -inf."""
    top_k = [seq.params.top_k for seq in seqs]
    top_p = [seq.params.top_p for seq in seqs]
    min_p = [seq.params.min_p for seq in seqs]
    device = logits.device
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        ranks = torch.arange(vocab, device=device)[None, :]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)[:, None]
        remove = ranks >= k
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= torch.tensor(top_p, device=device)[:, None]
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if any(p > 0 for p in min_p):
        probs = logits.softmax(dim=-1)
        threshold = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    """Samples the next token of every row of a batch. Holds what lives across steps: the penalty tables,
    and the random stream of requests without their own seed (seeded from the engine's ``seed``)."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0, cpu_kernels: bool | None = None) -> None:
        """``cpu_kernels``: argmax, temperature sampling and penalties by the C++ kernels (default: where they
        build for this device; decided here once)."""
        self.cpu_kernels = cpu_kernels_for(device, torch.float32) if cpu_kernels is None else cpu_kernels
        self.penalties = PenaltyState(vocab_size, device, self.cpu_kernels)
        self.token_masks = TokenMasks(vocab_size, device, self.cpu_kernels)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def release(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves the penalty tables."""
        self.penalties.release(seq)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]) -> list[SampledToken]:
        """``logits`` [B, vocab] float32, raw model output for each sequence's next token."""
        want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        # A grammar decides where its output ends: min_tokens does not hold back the stop it allows.
        held_back = [
            seq.params.min_tokens and seq.num_output_tokens < seq.params.min_tokens and seq.grammar is None
            for seq in seqs
        ]
        biased = [row for row, seq in enumerate(seqs) if seq.params.logit_bias]
        constrained = any(seq.grammar is not None for seq in seqs)
        if any(held_back) or biased or constrained or any(seq.params.has_penalties for seq in seqs):
            # These edit the logits in place: on a copy, so that the caller's stay raw (and logprobs report
            # the model's own distribution, as vLLM's do); a batch with none of them, the common case, skips
            # copying [B, vocab].
            logits = self.penalties.apply(logits.clone(), seqs)
        for row in biased:
            token_ids, biases = zip(*seqs[row].params.logit_bias)
            logits[row, list(token_ids)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        if constrained:  # last: no bias or penalty brings back a token the grammar forbids
            self.token_masks.apply(logits, seqs)
        for row, seq in enumerate(seqs):
            if held_back[row]:
                stops = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else eos_token_ids)
                if stops:
                    logits[row, stops] = float("-inf")

        greedy = [seq.params.greedy for seq in seqs]
        if all(greedy):
            chosen = self.argmax(logits)
        else:
            temperatures = torch.tensor([seq.params.temperature or 1.0 for seq in seqs], device=logits.device)
            uniforms = self._uniforms(seqs, greedy, logits.device)
            if self.cpu_kernels and not _needs_filter(seqs) and logits.dtype == torch.float32:
                # softmax(x / T) and its inverse CDF in one C++ call (five vocabulary-sized passes otherwise).
                sampled = cpu_ops.sample_rows(logits.contiguous(), temperatures, uniforms)
            else:
                probs = _filter(logits / temperatures[:, None], seqs).softmax(dim=-1)
                sampled = _inverse_cdf(probs, uniforms)
            chosen = sampled
            if any(greedy):
                chosen = torch.where(torch.tensor(greedy, device=logits.device), self.argmax(logits), sampled)
        self.penalties.record(seqs, chosen)

        chosen_ids = chosen.tolist()
        results = []
        for row, (seq, token_id) in enumerate(zip(seqs, chosen_ids)):
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs = token_logprobs(raw_logprobs[row], token_id, seq.params.logprobs)
            results.append(SampledToken(token_id, logprobs))
        return results

    def run_sampling(self, seqs: list[Sequence], steps: int) -> RunSampling | None:
        """What a fused run of ``steps`` decode steps of ``seqs`` (which neither truncate, penalise, bias nor
        report logprobs: ``decode_runs``) picks with: None when every row is greedy (the argmax), else the
        rows' temperatures and the uniform numbers ``sample`` would draw at each step, drawn now in the same
        order, so that every seeded row samples what it samples step by step."""
        greedy = [seq.params.greedy for seq in seqs]
        if all(greedy):
            return None
        device = torch.device("cpu")
        temperatures = torch.tensor([seq.params.temperature or 1.0 for seq in seqs])
        uniforms = torch.stack([self._uniforms(seqs, greedy, device) for _ in range(steps)])
        return RunSampling(temperatures, uniforms, torch.tensor(greedy) if any(greedy) else None)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits.argmax(dim=-1)``; on the CPU the C++ kernel's (PyTorch's compares one value at a time: 3 ms
        of a 64-stream step for a vocabulary of 32,000, against 0.2-0.6)."""
        if self.cpu_kernels and logits.dtype == torch.float32 and logits.dim() == 2:
            return cpu_ops.argmax_rows(logits.contiguous())
        return logits.argmax(dim=-1)

    def _uniforms(self, seqs: list[Sequence], greedy: list[bool], device: torch.device) -> torch.Tensor:
        """One uniform number in [0, 1) per row, float64: a seeded row's from its own stream, so that it samples
        the same tokens whatever else shares the batch; the others' from the engine's."""
        uniform = torch.rand(len(seqs), generator=self.generator, dtype=torch.float64, device=device)
        for row, seq in enumerate(seqs):
            if seq.generator is not None and not greedy[row]:
                uniform[row] = torch.rand(1, generator=seq.generator, dtype=torch.float64, device=device)
        return uniform


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from ``probs`` [B, vocab], by inverting each row's cumulative distribution at its
    uniform draw: one random number per row (a draw of vocabulary-sized noise, the Gumbel way, cost 12 ms a
    step at 16 rows of 32,000 on the CPU; this costs 0.3). The sums run in float64, so that rounding does not
    move mass between tokens; a token of probability 0 is never drawn."""
    cumulative = probs.double().cumsum(dim=-1)
    targets = uniforms[:, None] * cumulative[:, -1:]
    # The first token whose cumulative mass exceeds the target: zero-probability tokens add no mass, so
    # they are never the first to exceed it.
    chosen = torch.searchsorted(cumulative, targets, right=True)
    return chosen.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def token_logprobs(row: torch.Tensor, token_id: int, num_top: int) -> dict[int, Logprob]:
    """The chosen token's logprob and rank, plus the ``num_top`` most likely alternatives."""
    chosen = float(row[token_id])
    rank = int((row > row[token_id]).sum()) + 1
    result = {token_id: Logprob(chosen, rank)}
    if num_top:
        values, indices = row.topk(num_top)
        for position, (value, index) in enumerate(zip(values.tolist(), indices.tolist())):
            result.setdefault(index, Logprob(value, position + 1))
    return result
