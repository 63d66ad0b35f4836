"""Which sequences draft in a step, how many tokens, and what came of it: the core's side of speculation.

Plain Python, no tensors: the scheduler asks for drafts while it plans a step, the worker verifies them,
and the scheduler reports back how many were accepted. The counters here are what ``stats()`` and the
Prometheus endpoint show.
"""

from __future__ import annotations

from typing import Protocol

from clex_serve.engine.core.sequence import Sequence
from clex_serve.engine.spec_decode.adaptive import SequenceAcceptance, StepCost
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
        self.cost = StepCost()
        self._step_decodes = 1  # decodes of the step being planned
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
        self._step_decodes = num_decodes
        return not self.config.adaptive or self.cost.allows(num_decodes)

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
            break_even = self.cost.break_even(self._step_decodes)
            self._acceptance.setdefault(seq.seq_id, SequenceAcceptance()).record(num_drafted, num_accepted, break_even)

    def observe_step(self, num_decodes: int, num_drafted: int, seconds: float) -> None:
        """A step's decodes, the drafted tokens it verified, and its time."""
        self.cost.record(num_decodes, num_drafted, seconds)

    def release(self, seq: Sequence) -> None:
        self._acceptance.pop(seq.seq_id, None)
        self.proposer.release(seq.seq_id)


def observe_verify_step(drafter: Drafter, plan, seconds: float) -> None:
    """Tell the drafter how long a step of decodes took, and how many drafts it verified. Steps that also
    carry prompt tokens are not a decode step's time and are left out."""
    if plan.decodes and not plan.prefills:
        num_drafted = sum(len(chunk.draft_token_ids) for chunk in plan.decodes)
        drafter.observe_step(len(plan.decodes), num_drafted, seconds)


def spec_decode_counters(drafter: Drafter) -> dict[str, int]:
    """The drafter's counters under ``EngineStats``' names."""
    return {
        "spec_drafted_tokens": drafter.num_drafted_tokens,
        "spec_accepted_tokens": drafter.num_accepted_tokens,
        "spec_verifications": drafter.num_verifications,
    }
