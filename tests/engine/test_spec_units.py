"""Speculative decoding without a model: the config's keys and errors, the prompt-lookup proposer, the drafts
a step plans (cut at a CLEX scale boundary, within max_tokens, the budget and the free blocks), taking
rejected drafts back, and the turn-down by acceptance against the measured cost of a drafted row."""

import pytest

from clex_serve import SamplingParams
from clex_serve.engine.core.block_manager import BlockManager
from clex_serve.engine.core.scheduler import Scheduler, SchedulerConfig
from clex_serve.engine.core.verify_planning import draft_limit
from clex_serve.engine.spec_decode.adaptive import (
    EXPLORE_EVERY,
    MAX_PAUSE,
    MIN_SAMPLES,
    SequenceAcceptance,
    StepCost,
)
from clex_serve.engine.spec_decode.config import SpeculativeConfig
from clex_serve.engine.spec_decode.drafter import Drafter
from clex_serve.engine.spec_decode.ngram_proposer import NgramProposer
from clex_serve.engine.worker.sampler import SampledToken
from helpers.sequences import clex_scale, make_sequence


def test_config_takes_vllms_keys_and_defaults():
    config = SpeculativeConfig.from_user(
        '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
    )
    assert (config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == (5, 2, 4)
    assert SpeculativeConfig.from_user({"num_speculative_tokens": 3}).prompt_lookup_min == 5  # vLLM's default
    only_max = SpeculativeConfig.from_user({"num_speculative_tokens": 3, "prompt_lookup_max": 2})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (2, 2)
    assert SpeculativeConfig.from_user(None) is None and SpeculativeConfig.from_user("null") is None


@pytest.mark.parametrize(
    "value, message",
    [
        ({"method": "eagle", "num_speculative_tokens": 3}, "method 'eagle' is not supported"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
        ({"num_speculative_tokens": True}, "num_speculative_tokens must be a positive integer"),
        ({"num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "must not exceed"),
        ({"num_speculative_tokens": 3, "prompt_lookup_max": 0}, "prompt_lookup_max must be a positive"),
        ({"num_speculative_tokens": 3, "model": "some/draft"}, "key 'model' is not supported"),
        ({"num_speculative_tokens": 3, "lookahead": 2}, "unknown key 'lookahead'"),
        ({"num_speculative_tokens": 3, "disable_by_batch_size": -1}, "disable_by_batch_size must be"),
        ("{num_speculative_tokens: 3}", "not valid JSON"),
        ("[3]", "must be a JSON object"),
    ],
)
def test_config_errors_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_user(value)


def _brute_force(tokens, lookup_min, lookup_max, k):
    for n in range(min(lookup_max, len(tokens) - 1), lookup_min - 1, -1):
        suffix = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                return tokens[end : end + k]
    return []


def test_ngram_proposer_equals_a_scan_for_the_longest_latest_match():
    import random

    rng = random.Random(0)
    proposer = NgramProposer(2, 4)
    tokens = []
    for step in range(400):
        tokens.extend(rng.choice([[rng.randrange(6)], tokens[-7:-3] or [1], [rng.randrange(6)] * 2]))
        assert proposer.propose(0, tokens, 3) == _brute_force(tokens, 2, 4, 3), step
    assert NgramProposer(1, 3).propose(1, [1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert NgramProposer(1, 1).propose(2, [9, 8, 7], 3) == []


def test_draft_limit_stops_at_the_scale_boundary():
    # Base window 8: lengths 1..8 are scale 1, 9..16 scale 2.
    assert [draft_limit(length, 5, clex_scale, None) for length in (3, 6, 7, 8, 9)] == [5, 2, 1, 0, 5]
    assert draft_limit(14, 5, clex_scale, 16) == 2  # and at the model's length
    assert draft_limit(3, 0, clex_scale, None) == 0


class ListProposer:
    def __init__(self, drafts):
        self.drafts = drafts

    def propose(self, seq_id, token_ids, max_tokens):
        return self.drafts[:max_tokens]

    def release(self, seq_id):
        pass


def _scheduler(drafts, num_blocks=64, max_tokens_per_step=64, **spec):
    config = SpeculativeConfig(num_speculative_tokens=spec.pop("k", 4), adaptive=False, **spec)
    drafter = Drafter(config, ListProposer(drafts))
    manager = BlockManager(num_blocks, 4)
    scheduler = Scheduler(SchedulerConfig(8, max_tokens_per_step), manager, clex_scale, drafter=drafter)
    return scheduler, manager, drafter


def _decoding(scheduler, length, params=None, seq_id=0):
    """A sequence of ``length`` tokens whose prompt is computed, its last token to decode."""
    [seq] = _all_decoding(scheduler, [(length, params)], first_id=seq_id)
    return seq


def _all_decoding(scheduler, shapes, first_id=0):
    """Sequences of the given (length, params), prompts computed in one step, each with a token to decode."""
    seqs = [
        make_sequence(first_id + index, length - 1, params or SamplingParams(max_tokens=100))
        for index, (length, params) in enumerate(shapes)
    ]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule()
    scheduler.update_from_output(plan, {seq.seq_id: [SampledToken(50, None)] for seq in seqs})
    for seq, (length, _) in zip(seqs, shapes):
        assert len(seq) == length and seq.num_cached_tokens == length - 1
    return seqs


def test_a_verify_chunk_is_cut_at_the_boundary_and_takes_back_its_rejected_drafts():
    scheduler, manager, drafter = _scheduler([60, 61, 62, 63])
    seq = _decoding(scheduler, 11)  # scale 2 up to 16 tokens
    plan = scheduler.schedule()
    [chunk] = plan.decodes
    assert chunk.draft_token_ids == [60, 61, 62, 63] and (chunk.start, chunk.end) == (10, 15)
    assert chunk.token_ids == [50, 60, 61, 62, 63] and chunk.per_token_scale and chunk.scale == 2
    assert len(seq.block_table) == 4  # slots for every drafted position
    # The first draft accepted, the second rejected: two tokens come back.
    scheduler.update_from_output(plan, {seq.seq_id: [SampledToken(60, None), SampledToken(7, None)]})
    assert seq.token_ids[-3:] == [50, 60, 7] and seq.num_cached_tokens == 12 and len(seq.block_table) == 4
    assert (drafter.num_drafted_tokens, drafter.num_accepted_tokens, drafter.num_verifications) == (4, 1, 1)
    # 13 tokens: three more positions to the boundary at 16, and the blocks past them are not taken.
    [chunk] = scheduler.schedule().decodes
    assert chunk.draft_token_ids == [60, 61, 62] and chunk.end == 16
    scheduler.finish(seq)
    assert manager.num_free_blocks == manager.num_blocks


def test_all_rejected_gives_back_the_blocks_only_drafts_held():
    scheduler, manager, _ = _scheduler([60, 61, 62, 63], k=4)
    seq = _decoding(scheduler, 20)  # scale 3 up to 24: four drafts fit; blocks of 4 tokens
    plan = scheduler.schedule()
    assert plan.decodes[0].end == 24 and len(seq.block_table) == 6
    scheduler.update_from_output(plan, {seq.seq_id: [SampledToken(9, None)]})
    assert seq.num_cached_tokens == 20 and len(seq) == 21 and len(seq.block_table) == 6  # 21 tokens: 6 blocks
    free_before = manager.num_free_blocks
    plan = scheduler.schedule()
    scheduler.update_from_output(plan, {seq.seq_id: [SampledToken(9, None)]})
    assert seq.num_cached_tokens == 21 and manager.num_free_blocks == free_before


def test_drafts_respect_max_tokens_budget_blocks_and_eligibility():
    scheduler, manager, _ = _scheduler([60, 61, 62, 63])
    # One output token so far each; max_tokens 3: the step may yield two tokens, so one draft.
    penalised, first, second = _all_decoding(
        scheduler, [(3, SamplingParams(repetition_penalty=1.2)), (3, SamplingParams(max_tokens=3)), (3, None)]
    )
    scheduler.config = SchedulerConfig(8, 5)
    plan = scheduler.schedule()
    drafts = {chunk.seq.seq_id: chunk.draft_token_ids for chunk in plan.decodes}
    # The budget of 5 tokens holds the three decodes and two drafts; a sequence with penalties drafts nothing.
    assert drafts == {first.seq_id: [60], second.seq_id: [60], penalised.seq_id: []}
    assert sum(chunk.num_tokens for chunk in plan.decodes) <= 5
    # Out of free blocks: drafts are dropped, never the decode.
    scheduler, manager, _ = _scheduler([60, 61, 62, 63], num_blocks=3)
    seq = _decoding(scheduler, 12)  # 3 blocks of 4; its drafts would need a fourth
    [chunk] = scheduler.schedule().decodes
    assert chunk.draft_token_ids == [] and chunk.end == 12 and len(seq.block_table) == 3


def test_disable_by_batch_size_turns_a_step_off():
    scheduler, _, _ = _scheduler([60, 61], disable_by_batch_size=1)
    _all_decoding(scheduler, [(3, None), (3, None)])
    assert all(not chunk.draft_token_ids for chunk in scheduler.schedule().decodes)


def test_a_sequence_whose_drafts_fail_pauses_longer_each_time():
    acceptance = SequenceAcceptance()
    pauses = []
    for _ in range(12):
        acceptance.record(4, 0)
        skipped = 0
        while not acceptance.wants_drafts():
            skipped += 1
        pauses.append(skipped)
    assert pauses[0] == 0 and max(pauses) == MAX_PAUSE and pauses == sorted(pauses)
    acceptance.record(4, 4)
    acceptance.record(4, 4)
    assert acceptance.wants_drafts() and acceptance.next_pause < MAX_PAUSE


def test_step_cost_turns_off_where_a_row_costs_a_plain_token_and_explores():
    cost = StepCost()
    for _ in range(MIN_SAMPLES):
        cost.record(16, num_drafted=0, seconds=0.1)  # a plain token: 6.25 ms
        cost.record(16, num_drafted=32, seconds=0.3)  # a drafted row: (0.3 - 0.1) / 32 = 6.25 ms
        cost.record(1, num_drafted=0, seconds=0.02)  # a plain token: 20 ms
        cost.record(1, num_drafted=4, seconds=0.024)  # a drafted row: 1 ms
    assert cost.break_even(16) > 1.0  # no acceptance could pay for such rows
    assert cost.break_even(1) == pytest.approx(0.05 / 0.97)
    decisions = [cost.allows(16) for _ in range(2 * EXPLORE_EVERY)]
    assert decisions.count(True) == 2  # only its exploration steps
    single = [cost.allows(1) for _ in range(2 * EXPLORE_EVERY)]
    assert single.count(False) == 2  # a plain step now and then, to keep its time measured


def test_step_cost_speculates_until_measured_with_plain_steps_between():
    cost = StepCost()
    assert cost.break_even(1) == 0.0
    assert [cost.allows(1) for _ in range(8)] == [True, True, True, False] * 2
    cost.record(1, num_drafted=4, seconds=0.05)  # no plain time yet: says nothing of a row
    assert cost.break_even(1) == 0.0


def test_a_sequence_pauses_only_below_the_break_even_of_its_rows():
    # Drafts kept 40% of the time pay where a row costs a tenth of a token, not where it costs half.
    cheap, dear = SequenceAcceptance(), SequenceAcceptance()
    for _ in range(10):
        cheap.record(5, 2, break_even=0.1)
        dear.record(5, 2, break_even=0.5)
    assert cheap.pause_left == 0 and cheap.wants_drafts()
    assert dear.pause_left > 0 and not dear.wants_drafts()
