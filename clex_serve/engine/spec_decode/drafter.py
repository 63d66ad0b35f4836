"""Which sequences draft in a step, how many tokens, and what came of it: the core's side of speculation.

Plain Python, no tensors: the scheduler asks for drafts while it plans a step, the worker verifies them,
and the scheduler reports back how many were accepted. The counters here are what ``stats()`` and the
Prometheus endpoint show.
"""

from __future__ import annotations

from typing import Protocol

from clex_serve.engine.core.sequence import Sequence
from clex_serve.engine.spec_decode.adaptive import SequenceAcceptance, StepThroughput
from clex_serve.engine.spec_decode.config import SpeculativeConfig
from clex_serve.engine.spec_decode.ngram_proposer import NgramProposer
from clex_serve.sampling_params import SamplingParams


class Proposer(Protocol):
    def propose(self, seq_id: int, token_ids: list[int], max_tokens: int) -> list[int]: ...

    def release(self, seq_id: int) -> None: ...


def speculation_supported(params: SamplingParams) -> bool:
    """Whether a request's sampling can verify drafts exactly.

    Not with penalties: each drafted position would need the counts that include the drafts before it,
    which the penalty tables (kept per sequence, not per position) do not hold. Structured outputs can: a
    draft is cut where its grammar rejects it (``Drafter.propose``), and each verified row is masked with the
    grammar after the drafts before it (``TokenMasks.apply_along_draft``).
    """
    return not params.has_penalties


class Drafter:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        self.proposer = proposer or NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.throughput = StepThroughput()
        self._acceptance: dict[int, SequenceAcceptance] = {}
        self.num_drafted_tokens = 0
        self.num_accepted_tokens = 0
        self.num_verifications = 0  # verified drafts of one sequence in one step

    @property
    def max_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def step_allows(self, num_decodes: int) -> bool:
        """Whether a step decoding ``num_decodes`` sequences drafts at all."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_decodes > limit:
            return False
        return not self.config.adaptive or self.throughput.allows(num_decodes)

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        if max_tokens < 1 or not speculation_supported(seq.params):
            return []
        if self.config.adaptive and not self._acceptance.setdefault(seq.seq_id, SequenceAcceptance()).wants_drafts():
            return []
        draft = self.proposer.propose(seq.seq_id, seq.token_ids, max_tokens)
        if draft and seq.grammar is not None:  # a token the grammar forbids could never be kept
            draft = draft[: seq.grammar.valid_prefix(draft)]
        return draft

    def record(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        self.num_drafted_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        self.num_verifications += 1
        if self.config.adaptive:
            self._acceptance.setdefault(seq.seq_id, SequenceAcceptance()).record(num_drafted, num_accepted)

    def observe_step(self, num_decodes: int, verified: bool, num_tokens: int, seconds: float) -> None:
        """A step's decodes, whether any of them verified drafts, the tokens they generated, its time."""
        self.throughput.record(num_decodes, verified, num_tokens, seconds)

    def release(self, seq: Sequence) -> None:
        self._acceptance.pop(seq.seq_id, None)
        self.proposer.release(seq.seq_id)


def observe_verify_step(drafter: Drafter, plan, sampled: dict[int, list], seconds: float) -> None:
    """Tell the drafter how a step went: its decodes, whether any verified drafts, the tokens they yielded."""
    if plan.decodes:
        verified = any(chunk.draft_token_ids for chunk in plan.decodes)
        num_tokens = sum(len(sampled.get(chunk.seq.seq_id, ())) for chunk in plan.decodes)
        drafter.observe_step(len(plan.decodes), verified, num_tokens, seconds)


def spec_decode_counters(drafter: Drafter) -> dict[str, int]:
    """The drafter's counters under ``EngineStats``' names."""
    return {
        "spec_drafted_tokens": drafter.num_drafted_tokens,
        "spec_accepted_tokens": drafter.num_accepted_tokens,
        "spec_verifications": drafter.num_verifications,
    }
