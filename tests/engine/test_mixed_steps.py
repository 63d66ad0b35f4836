"""Mixed steps: every step decodes each running stream by one token and spends what is left of the token budget
on prompt and recompute chunks. The scheduler alone first (no model), then the engine on the reference
checkpoints, with requests arriving while others decode, against the official golden outputs."""

import random
from collections import Counter

import pytest
import torch

from clex_serve import LLM, SamplingParams
from clex_serve.config import ModelConfig
from clex_serve.engine.core.block_manager import BlockManager, PrefixKey
from clex_serve.engine.core.scheduler import Scheduler, SchedulerConfig
from clex_serve.engine.worker.kv_cache import bytes_per_block
from helpers.models import model_with_tokenizer
from helpers.reference import FIXTURES, reference_cases, requires_cuda
from helpers.sequences import clex_scale, make_sequence


def _scheduler(num_blocks=64, budget=8, max_num_seqs=8, prefix_caching=False):
    manager = BlockManager(num_blocks, 4, prefix_caching)

    def prefix_key(seq):
        return PrefixKey(clex_scale(seq.num_prompt_tokens), None) if prefix_caching else None

    return Scheduler(SchedulerConfig(max_num_seqs, budget), manager, clex_scale, prefix_key)


def _check_blocks(scheduler):
    """Every reference count is the number of block tables holding the block; the rest are free."""
    manager = scheduler.block_manager
    holders = Counter(block for seq in scheduler.running for block in seq.block_table)
    assert [manager.ref_counts[block] for block in range(manager.num_blocks)] == [
        holders[block] for block in range(manager.num_blocks)
    ]
    assert manager.num_free_blocks == sum(1 for block in range(manager.num_blocks) if not holders[block])
    assert all(not seq.block_table for seq in scheduler.waiting)


def _step(scheduler):
    """Schedule a step, check the rules every plan keeps, then do what the engine does after running it."""
    decoding = [seq for seq in scheduler.running if not scheduler.needs_prefill(seq)]
    waiting_before = list(scheduler.waiting)
    out = scheduler.schedule()
    seqs = [chunk.seq for chunk in out.chunks]
    assert len(set(seqs)) == len(seqs), "a sequence twice in one step"
    # Every decoding sequence that was not preempted gets exactly its next token.
    assert [chunk.seq for chunk in out.decodes] == [seq for seq in decoding if seq not in out.preempted]
    assert all((chunk.start, chunk.end) == (len(chunk.seq) - 1, len(chunk.seq)) for chunk in out.decodes)
    assert all(chunk.num_tokens >= 1 for chunk in out.prefills)
    assert out.num_prefill_tokens <= max(0, scheduler.config.max_num_batched_tokens - out.num_decode_tokens)
    if out.preempted:  # nothing is admitted in a step that had to preempt
        assert not [seq for seq in seqs if seq in waiting_before]
    assert all(seq in scheduler.running for seq in seqs)
    assert all(len(seq.block_table) * 4 >= chunk.end for seq, chunk in zip(seqs, out.chunks))
    destinations = [destination for _, destination in out.block_copies]
    assert len(set(destinations)) == len(destinations)
    _check_blocks(scheduler)
    for chunk in out.chunks:
        seq = chunk.seq
        seq.num_cached_tokens = chunk.end
        seq.cache_scale = chunk.scale
        if chunk.is_prompt_pass and chunk.end == seq.num_prompt_tokens and seq.num_output_tokens == 0:
            scheduler.block_manager.register_prompt_blocks(seq, scheduler.prefix_key(seq))
        if chunk.samples:
            seq.token_ids.append(9)
    return out


def test_step_runs_every_decode_and_a_prompt_chunk_in_the_budget_left():
    scheduler = _scheduler(budget=8)
    a, b, c = make_sequence(0, 5), make_sequence(1, 3), make_sequence(2, 20)
    scheduler.add(a)
    scheduler.add(b)
    out = _step(scheduler)
    assert [chunk.seq for chunk in out.prefills] == [a, b] and not out.decodes
    scheduler.add(c)
    out = _step(scheduler)
    assert [chunk.seq for chunk in out.decodes] == [a, b]
    [chunk] = out.prefills
    assert (chunk.seq, chunk.start, chunk.end, chunk.scale_len, chunk.scale, chunk.samples) == (c, 0, 6, 20, 3, False)
    assert (out.num_decode_tokens, out.num_prefill_tokens) == (2, 6)


def test_long_prompt_is_chunked_while_a_running_sequence_decodes_every_step():
    """The prompt's chunks all rotate at the full prompt's scale; the running stream gets one token in each of
    those steps, and crosses a scale boundary (re-rotating its cache) in the middle of them."""
    scheduler = _scheduler(budget=5)
    a, b = make_sequence(0, 5), make_sequence(1, 30)
    scheduler.add(a)
    _step(scheduler)
    scheduler.add(b)
    prompt_chunks, decodes = [], []
    while scheduler.needs_prefill(b):
        length = len(a)
        out = _step(scheduler)
        [decode] = out.decodes
        assert decode.seq is a and decode.end == length and len(a) == length + 1
        [chunk] = out.prefills
        assert chunk.seq is b and chunk.is_prompt_pass and chunk.scale_len == 30
        prompt_chunks.append((chunk.start, chunk.end, chunk.scale, chunk.samples))
        decodes.append((decode.scale, decode.rescale_from))
    assert prompt_chunks == [(start, start + 4, 4, False) for start in range(0, 28, 4)] + [(28, 30, 4, True)]
    assert decodes == [(1, None)] * 3 + [(2, 1)] + [(2, None)] * 4
    out = _step(scheduler)
    assert [chunk.seq for chunk in out.decodes] == [a, b] and not out.prefills


def test_decodes_take_their_blocks_before_any_admission():
    """One free block, which the running sequence's next token needs: the newcomer that would fit in it waits,
    where admitting it first would have forced a preemption."""
    scheduler = _scheduler(num_blocks=3, budget=64)
    a, newcomer = make_sequence(0, 8), make_sequence(1, 4)
    scheduler.add(a)
    _step(scheduler)
    assert len(a) == 9 and scheduler.block_manager.num_free_blocks == 1
    scheduler.add(newcomer)
    out = _step(scheduler)
    assert [chunk.seq for chunk in out.decodes] == [a] and not out.prefills and not out.preempted
    assert list(scheduler.waiting) == [newcomer]


def test_a_step_that_preempts_admits_nothing_and_the_recompute_runs_beside_decodes():
    """Four blocks. The older stream's next token needs a block: the newer one is preempted and gives back two,
    one of which would fit the newcomer, but a step that preempted admits nothing; the preempted sequence then
    stays ahead of the newcomer, and its recompute replays its decoded tokens beside a decode."""
    scheduler = _scheduler(num_blocks=4, budget=64, max_num_seqs=3)
    a, b, newcomer = make_sequence(0, 4), make_sequence(1, 4), make_sequence(2, 2)
    scheduler.add(a)
    scheduler.add(b)
    _step(scheduler)
    scheduler.add(newcomer)
    for _ in range(4):  # lengths 5..8: two blocks each, the whole pool
        out = _step(scheduler)
        assert [chunk.seq for chunk in out.decodes] == [a, b] and not out.prefills and not out.preempted
    out = _step(scheduler)
    assert out.preempted == [b] and [chunk.seq for chunk in out.decodes] == [a] and not out.prefills
    assert list(scheduler.waiting) == [b, newcomer] and scheduler.block_manager.num_free_blocks == 1
    while len(a) < 13:  # b's recompute needs three blocks; the newcomer waits behind it
        out = _step(scheduler)
        assert [chunk.seq for chunk in out.chunks] == [a] and list(scheduler.waiting) == [b, newcomer]
    scheduler.finish(a)
    out = _step(scheduler)
    assert [(chunk.seq, chunk.start, chunk.end) for chunk in out.prefills] == [(b, 0, 4), (newcomer, 0, 2)]
    out = _step(scheduler)
    assert [chunk.seq for chunk in out.decodes] == [newcomer]
    [chunk] = out.prefills
    assert (chunk.seq, chunk.start, chunk.end, chunk.per_token_scale, chunk.samples) == (b, 4, 8, True, False)
    out = _step(scheduler)
    assert [(chunk.seq, chunk.scale, chunk.rescale_from) for chunk in out.decodes] == [(b, 2, 1), (newcomer, 1, None)]


def test_decodes_that_fill_the_budget_hold_back_prompts_until_one_finishes():
    """The progress rule: decodes are never held back and prompt chunks only get what they leave. While decodes
    take all of it nothing is admitted, so the running set can only shrink; the first decode that finishes
    frees budget for the oldest prompt work, which then advances every step."""
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)
    scheduler = _scheduler(budget=2, max_num_seqs=4)
    a, b, c = make_sequence(0, 1), make_sequence(1, 1), make_sequence(2, 3)
    scheduler.add(a)
    scheduler.add(b)
    _step(scheduler)
    scheduler.add(c)
    for _ in range(5):
        out = _step(scheduler)
        assert [chunk.seq for chunk in out.decodes] == [a, b] and not out.prefills
        assert list(scheduler.waiting) == [c]
    scheduler.finish(a)
    chunks = []
    while scheduler.needs_prefill(c) or c in scheduler.waiting:
        out = _step(scheduler)
        assert [chunk.seq for chunk in out.decodes] == [b]
        chunks += [(chunk.start, chunk.end) for chunk in out.prefills if chunk.seq is c]
    assert chunks == [(0, 1), (1, 2), (2, 3)]
    # Decodes beyond the budget (here a budget lowered under running streams) all still run.
    scheduler.config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1)
    scheduler.add(make_sequence(3, 2))
    out = _step(scheduler)
    assert [chunk.seq for chunk in out.decodes] == [b, c] and not out.prefills and len(scheduler.waiting) == 1


def test_shared_blocks_are_copied_when_decodes_and_a_prompt_chunk_share_a_step():
    """Two sequences share two prompt blocks at scale 2 and cross to scale 3 in consecutive steps while a
    newcomer's prompt is chunked: the first to cross copies the shared blocks into blocks reserved for it at
    plan time, the second then re-rotates the originals it holds alone, and the newcomer's blocks are its own;
    it waits where the decodes' blocks leave too few."""
    # Before the first crossing the two hold six blocks; that step's decode takes three (two copies and a new
    # block for its 17th token), the newcomer five, and the second's 17th token one more at the next step.
    for num_blocks, admitted in ((15, True), (13, False)):
        scheduler = _scheduler(num_blocks=num_blocks, budget=16, prefix_caching=True)
        manager = scheduler.block_manager
        first, second = make_sequence(0, 12), make_sequence(1, 12)
        scheduler.add(first)
        _step(scheduler)
        scheduler.add(second)
        _step(scheduler)
        assert second.block_table[:2] == first.block_table[:2] and manager.prefix_hit_blocks == 2
        while len(first) < 17:
            _step(scheduler)
        newcomer = make_sequence(2, 20)  # scale 3: none of the cached blocks, five of its own
        scheduler.add(newcomer)
        shared = first.block_table[:2]
        out = _step(scheduler)
        assert [(chunk.seq, chunk.scale, chunk.rescale_from) for chunk in out.decodes] == [
            (first, 3, 2),
            (second, 2, None),
        ]
        assert [source for source, _ in out.block_copies] == shared
        assert [destination for _, destination in out.block_copies] == first.block_table[:2]
        assert second.block_table[:2] == shared
        if not admitted:
            assert not out.prefills and list(scheduler.waiting) == [newcomer]
            continue
        assert [(chunk.seq, chunk.start, chunk.end) for chunk in out.prefills] == [(newcomer, 0, 14)]
        assert not set(newcomer.block_table) & set(first.block_table + second.block_table)
        out = _step(scheduler)
        assert [(chunk.seq, chunk.scale, chunk.rescale_from) for chunk in out.decodes] == [
            (first, 3, None),
            (second, 3, 2),
        ]
        assert out.block_copies == [] and second.block_table[:2] == shared
        assert [(chunk.seq, chunk.start, chunk.end) for chunk in out.prefills] == [(newcomer, 14, 20)]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_random_arrivals_all_finish_and_every_step_keeps_the_rules(prefix_caching):
    """Arrivals at random steps, a small budget and a pool small enough to preempt: every step keeps the checks
    of ``_step``, decodes share steps with prompt chunks, with recomputes and (prefix caching on) with copy on
    write, and every request finishes."""
    rng = random.Random(0)
    scheduler = _scheduler(num_blocks=16, budget=4, max_num_seqs=4, prefix_caching=prefix_caching)
    arrivals = sorted((rng.randrange(60), seq_id) for seq_id in range(16))
    targets = {}
    finished, step = [], 0
    mixed = beside_recompute = beside_copies = 0
    while arrivals or scheduler.has_work():
        while arrivals and arrivals[0][0] <= step:
            _, seq_id = arrivals.pop(0)
            seq = make_sequence(seq_id, rng.randint(1, 20))
            targets[seq_id] = len(seq) + rng.randint(1, 30)
            scheduler.add(seq)
        out = _step(scheduler)
        if out.decodes and out.prefills:
            mixed += 1
            beside_recompute += any(chunk.per_token_scale for chunk in out.prefills)
            beside_copies += bool(out.block_copies)
        for chunk in out.chunks:
            if chunk.samples and len(chunk.seq) >= targets[chunk.seq.seq_id]:
                scheduler.finish(chunk.seq)
                finished.append(chunk.seq.seq_id)
        step += 1
        assert step < 2000, "a request starved"
    assert sorted(finished) == list(range(16))
    assert mixed > 50 and beside_recompute > 0 and scheduler.num_preemptions > 0
    assert beside_copies > 0 if prefix_caching else scheduler.block_manager.prefix_hits == 0
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


# ---------------------------------------------------------------------------------------------- the engine

GREEDY_TO_LIMIT = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, logprobs=0)
BUDGET = 8
# (step, request id, prompt length): the golden prompts of 7 (scale 1) and 35 (scale 2) tokens arrive while
# earlier ones decode. b's chunks run while a crosses from scale 1 to 2, d's and e's while a, b and c cross.
ARRIVALS = [(0, "a", 7), (23, "b", 35), (25, "c", 7), (52, "d", 35), (56, "e", 7)]


def _tiny_pool(name):
    """Cache memory for 40 blocks of 4 (the pool's padding block on top): one sequence at the 128-token
    limit fits, the five together do not, so the newest are preempted and recomputed beside decodes."""
    per_block = bytes_per_block(ModelConfig.from_file(FIXTURES / name / "config.json"), 4, torch.float32)
    return {"kv_cache_memory_gib": 41 * per_block / 2**30}


@pytest.mark.parametrize(
    "name,options,device",
    [
        ("llama_logscale", {}, "cpu"),
        ("mixtral", {"enable_prefix_caching": True}, "cpu"),
        ("llama_logscale", "tiny pool", "cpu"),
        # Plain decode steps replay CUDA graphs, mixed ones run eagerly: a stream alternates between the two.
        pytest.param("llama_logscale", {"kv_cache_memory_gib": 0.05}, "cuda", marks=requires_cuda),
    ],
    ids=["log-scale", "prefix-caching", "preemption", "cuda-graphs"],
)
def test_requests_arriving_while_others_decode_give_golden_outputs(name, options, device, tmp_path):
    """Prompts computed in chunks beside running decodes, with 8 batched tokens per step: every output is the
    official greedy generation, with its logprobs. The plans are recorded, so that the test fails if the
    steps it is about were never mixed."""
    preempting = options == "tiny pool"
    options = _tiny_pool(name) if preempting else options
    llm = LLM(
        str(model_with_tokenizer(name, tmp_path)),
        dtype="float32",
        device=device,
        show_progress=False,
        block_size=4,
        max_num_batched_tokens=BUDGET,
        **options,
    )
    engine = llm.engine
    scheduler = engine.scheduler
    plans = []
    schedule = scheduler.schedule

    def recording_schedule():
        decoding = [seq for seq in scheduler.running if not scheduler.needs_prefill(seq)]
        plan = schedule()
        assert [chunk.seq for chunk in plan.decodes] == [seq for seq in decoding if seq not in plan.preempted]
        assert plan.num_decode_tokens + plan.num_prefill_tokens <= BUDGET
        plans.append(plan)
        return plan

    scheduler.schedule = recording_schedule
    cases = reference_cases(name)
    pending, finished, step = list(ARRIVALS), {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, request_id, prompt_len = pending.pop(0)
            engine.add_request(
                {"prompt_token_ids": cases["sequence"][:prompt_len].tolist()}, GREEDY_TO_LIMIT, request_id
            )
        finished.update({output.request_id: output for output in engine.step() if output.finished})
        step += 1
        assert step < 1000

    for _, request_id, prompt_len in ARRIVALS:
        completion = finished[request_id].outputs[0]
        assert completion.token_ids == cases[f"greedy_from_{prompt_len}"].tolist(), request_id
        expected = torch.log_softmax(cases[f"greedy_logits_from_{prompt_len}"], dim=-1)
        for position, (token, logprobs) in enumerate(zip(completion.token_ids, completion.logprobs)):
            assert abs(logprobs[token].logprob - expected[position, token].item()) < 1e-4
    mixed = [plan for plan in plans if plan.decodes and plan.prefills]
    assert len(mixed) >= 10
    # Decodes re-rotate their cache at a scale boundary in the same step as a prompt chunk, and prompt
    # chunks at the prompt's scale share steps with decodes at other scales.
    assert any(chunk.rescale_from is not None for plan in mixed for chunk in plan.decodes)
    assert any({chunk.scale for chunk in plan.decodes} - {chunk.scale for chunk in plan.prefills} for plan in mixed)
    if options.get("enable_prefix_caching"):
        assert engine.block_manager.prefix_hits > 0 and any(plan.block_copies for plan in mixed)
    if preempting:
        assert scheduler.num_preemptions > 0
        assert any(chunk.per_token_scale for plan in mixed for chunk in plan.prefills)  # recomputes
    if device == "cuda":
        assert engine.worker.runner.decode_graphs is not None and any(not plan.prefills for plan in plans)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prompt_tokens_beside_decodes_are_capped_but_a_lone_prompt_takes_the_budget():
    manager = BlockManager(64, 4)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_prefill_tokens_with_decodes=5)
    scheduler = Scheduler(config, manager, clex_scale)
    first = make_sequence(0, 40)
    scheduler.add(first)
    assert [chunk.num_tokens for chunk in _step(scheduler).prefills] == [32]  # nothing decodes: the budget
    assert [chunk.num_tokens for chunk in _step(scheduler).prefills] == [8]
    second = make_sequence(1, 40)
    scheduler.add(second)
    for _ in range(3):
        out = _step(scheduler)
        assert [chunk.seq for chunk in out.decodes] == [first]
        assert out.num_prefill_tokens == 5  # beside a decode: the cap
    with pytest.raises(ValueError, match="max_prefill_tokens_with_decodes must be at least 1, got 0"):
        SchedulerConfig(max_prefill_tokens_with_decodes=0)


def test_short_prompts_beside_decodes_go_whole_long_ones_by_the_cap():
    """Beside decodes, a prompt that fits in eight times the cap is computed in one step (a chat turn does
    not wait several steps for its first token); a long one keeps to the cap; together they stay within
    the short budget, and the short budget within the step's."""
    manager = BlockManager(256, 4)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens_with_decodes=3)
    assert config.short_prompt_tokens_with_decodes == 24
    scheduler = Scheduler(config, manager, clex_scale)
    first = make_sequence(0, 8)
    scheduler.add(first)
    assert [chunk.num_tokens for chunk in _step(scheduler).prefills] == [8]
    long_prompt, short_one, short_two = make_sequence(1, 40), make_sequence(2, 12), make_sequence(3, 12)
    for seq in (long_prompt, short_one, short_two):
        scheduler.add(seq)
    out = _step(scheduler)
    # The long prompt (first in line) takes the cap; the first short one fits whole in the short budget;
    # the second would pass the step's share (3 + 12 + 12 > 24) and waits.
    assert [(chunk.seq, chunk.num_tokens) for chunk in out.prefills] == [(long_prompt, 3), (short_one, 12)]
    out = _step(scheduler)
    assert [(chunk.seq, chunk.num_tokens) for chunk in out.prefills] == [(long_prompt, 3), (short_two, 12)]
    out = _step(scheduler)
    assert {chunk.seq for chunk in out.decodes} == {first, short_one, short_two}
    assert [(chunk.seq, chunk.num_tokens) for chunk in out.prefills] == [(long_prompt, 3)]  # long: the cap
