"""The block manager and scheduler alone (no model, no tensors), sampling rules, streaming text."""

import pytest
import torch

from clex_serve import SamplingParams
from clex_serve.engine.core.block_manager import BlockManager, PrefixKey
from clex_serve.engine.core.scheduler import Scheduler, SchedulerConfig
from clex_serve.engine.worker.sampler import Sampler
from clex_serve.text.detokenizer import IncrementalDetokenizer
from helpers.models import (
    TRAINING_TEXT,
    byte_level_tokenizer,
    sentencepiece_style_tokenizer,
)
from helpers.sequences import clex_scale, make_sequence


def test_block_manager_allocates_appends_and_frees():
    manager = BlockManager(num_blocks=6, block_size=4)
    a, b = make_sequence(0, 9), make_sequence(1, 4)
    assert manager.can_allocate(a)
    manager.allocate(a)
    manager.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1 and manager.num_free_blocks == 2
    assert not set(a.block_table) & set(b.block_table)
    manager.append(a, 13)
    assert len(a.block_table) == 4 and manager.num_free_blocks == 1
    assert not manager.can_allocate(make_sequence(2, 9))
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 6


def test_prefix_blocks_are_reused_only_under_the_same_scale_key():
    manager = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = make_sequence(0, 13)
    manager.allocate(first, PrefixKey(2, None))
    manager.register_prompt_blocks(first, PrefixKey(2, None))
    first.num_cached_tokens = 13
    same = make_sequence(1, 13)
    manager.allocate(same, PrefixKey(2, None))
    assert same.block_table[:3] == first.block_table[:3] and same.num_cached_tokens == 12
    assert same.cache_scale == 2
    other_scale = make_sequence(2, 13)
    manager.allocate(other_scale, PrefixKey(3, None))
    assert other_scale.num_cached_tokens == 0 and not set(other_scale.block_table) & set(first.block_table)
    # A scale change re-rotates in place: shared blocks are copied first, owned ones leave the index.
    copies = manager.prepare_rescale(same)
    assert [source for source, _ in copies] == first.block_table[:3]
    assert manager.prepare_rescale(first) == []
    late = make_sequence(3, 13)
    manager.allocate(late, PrefixKey(2, None))
    assert late.num_cached_tokens == 0


def test_scheduler_admits_new_requests_beside_running_decodes():
    manager = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), manager, clex_scale)
    a = make_sequence(0, 5)
    scheduler.add(a)
    out = scheduler.schedule()
    assert not out.decodes and [c.seq for c in out.prefills] == [a] and out.num_prefill_tokens == 5
    a.num_cached_tokens = 5
    a.token_ids.append(7)
    out = scheduler.schedule()
    assert not out.prefills and out.num_decode_tokens == 1 and out.chunks[0].num_tokens == 1
    a.num_cached_tokens = 6
    a.token_ids.append(7)
    b = make_sequence(1, 3)
    scheduler.add(b)
    out = scheduler.schedule()  # the newcomer is admitted at the next step, beside the running decode
    assert [c.seq for c in out.decodes] == [a] and [c.seq for c in out.prefills] == [b]
    assert [c.seq for c in out.chunks] == [a, b]


def _run_chunks(out):
    """What the engine does after a step: the chunk's tokens are cached and a token is sampled."""
    for chunk in out.chunks:
        chunk.seq.num_cached_tokens = chunk.end
        chunk.seq.token_ids.append(9)


def test_scheduler_limits_sequences_and_preempts_the_newest_when_blocks_run_out():
    manager = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), manager, clex_scale)
    seqs = [make_sequence(i, 4) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    out = scheduler.schedule()
    assert [c.seq for c in out.chunks] == seqs[:2]  # max_num_seqs
    _run_chunks(out)
    for _ in range(4):  # lengths 5..8: two blocks each, the whole pool
        out = scheduler.schedule()
        assert not out.prefills and not out.preempted and len(out.decodes) == 2
        _run_chunks(out)
    out = scheduler.schedule()  # length 9 needs a third block each: the newest is preempted
    assert out.preempted == [seqs[1]] and [c.seq for c in out.chunks] == [seqs[0]]
    assert scheduler.waiting[0] is seqs[1] and seqs[1].block_table == [] and seqs[1].num_cached_tokens == 0
    assert manager.num_free_blocks == 1


def test_recompute_replays_each_scale_in_its_own_chunk():
    manager = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), manager, clex_scale)
    seq = make_sequence(0, 5)
    seq.token_ids += list(range(100, 120))  # 20 generated tokens: lengths 6..25 span scales 1, 2, 3, 4
    scheduler.add(seq)
    chunks = []
    while seq.num_cached_tokens < len(seq):
        [chunk] = scheduler.schedule().chunks
        chunks.append((chunk.start, chunk.end, chunk.is_prompt_pass, chunk.per_token_scale))
        seq.num_cached_tokens = chunk.end
    assert chunks == [
        (0, 5, True, False),
        (5, 8, False, True),
        (8, 16, False, True),
        (16, 24, False, True),
        (24, 25, False, False),
    ]  # the last is a plain decode step


def test_sampling_rules():
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0]] * 4)
    seqs = [
        make_sequence(i, 2, p)
        for i, p in enumerate(
            [
                SamplingParams(temperature=0),
                SamplingParams(temperature=1.0, top_k=1),
                SamplingParams(temperature=5.0, min_p=0.99),
                SamplingParams(temperature=0, repetition_penalty=100.0),  # tokens 1 and 2 are in the prompt
            ]
        )
    ]
    tokens = [s.token_id for s in Sampler(logits.shape[-1], torch.device("cpu")).sample(logits, seqs, eos_token_ids=[])]
    assert tokens == [1, 1, 1, 0]


@pytest.mark.parametrize("make_tokenizer", [byte_level_tokenizer, sentencepiece_style_tokenizer])
def test_incremental_detokenization_streams_exact_text(make_tokenizer):
    tokenizer = make_tokenizer()
    text = TRAINING_TEXT[1] + " Ünïcödé ✓ 🙂🙂 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt, generated = ids[:3], ids[3:] + [tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    assert detokenizer._rust_decode is not None  # the fast path (transformers' decode, minus its Python)
    pieces = [detokenizer.add(token) for token in generated]
    assert "".join(pieces) == tokenizer.decode(ids[3:], skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)


def test_long_prompt_is_chunked_at_the_full_prompts_scale():
    manager = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=4), manager, clex_scale)
    seq = make_sequence(0, 10)
    scheduler.add(seq)
    chunks = []
    while scheduler.needs_prefill(seq):
        [chunk] = scheduler.schedule().chunks
        chunks.append((chunk.start, chunk.end, chunk.scale_len, chunk.samples))
        seq.num_cached_tokens = chunk.end
        if chunk.samples:
            seq.token_ids.append(9)
    assert chunks == [(0, 4, 10, False), (4, 8, 10, False), (8, 10, 10, True)]


def test_sampling_follows_the_distribution_and_seeds_are_independent_of_the_batch():
    # 4,000 draws from a known distribution (one row per draw): each token's frequency within 4 standard
    # deviations of its probability; a top-k-filtered token never drawn; a seeded row draws the same tokens
    # alone and beside others.
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probabilities.clamp_min(1e-30).log()
    rows = 4000
    seqs = [make_sequence(i, 2, SamplingParams(temperature=1.0, top_k=4)) for i in range(rows)]
    sampler = Sampler(5, torch.device("cpu"), seed=1)
    drawn = torch.tensor([s.token_id for s in sampler.sample(logits.expand(rows, 5).clone(), seqs, [])])
    counts = torch.bincount(drawn, minlength=5).double()
    expected = probabilities.double() * rows
    spread = (rows * probabilities.double() * (1 - probabilities.double())).sqrt()
    assert ((counts - expected).abs() <= 4 * spread + 1e-9).all(), counts
    assert counts[4] == 0

    def seeded_run(neighbours: int) -> list[int]:
        seeded = make_sequence(0, 2, SamplingParams(temperature=1.0, seed=7))
        seeded.generator = torch.Generator().manual_seed(7)  # as the engine gives a seeded request
        others = [make_sequence(i + 1, 2, SamplingParams(temperature=1.0)) for i in range(neighbours)]
        batch_sampler = Sampler(5, torch.device("cpu"), seed=neighbours)
        tokens = []
        for _ in range(30):
            batch = [seeded, *others]
            tokens.append(batch_sampler.sample(logits.expand(len(batch), 5).clone(), batch, [])[0].token_id)
        return tokens

    assert seeded_run(0) == seeded_run(5)


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_temperature_sampling_follows_the_scaled_distribution(cpu_kernel):
    """Unfiltered temperature sampling (the C++ call on the CPU where it builds, else PyTorch's softmax and
    cumulative sum): 4,000 draws at temperature 0.5 over a vocabulary of 40 (two full 16s and a tail of 8)
    follow softmax(logits / 0.5) within 4 standard deviations per token; tokens of logit -inf never come."""
    from clex_serve.kernels.cpu_extension import cpu_kernels_available

    if cpu_kernel and not cpu_kernels_available():
        pytest.skip("CPU kernels do not build here")
    mass = {0: 0.4, 1: 0.2, 2: 0.15, 3: 0.05, 20: 0.1, 35: 0.1}
    logits = torch.full((40,), float("-inf"))
    for token, probability in mass.items():
        logits[token] = torch.tensor(probability).log()
    rows = 4000
    seqs = [make_sequence(i, 2, SamplingParams(temperature=0.5)) for i in range(rows)]
    drawn = torch.tensor(
        [
            s.token_id
            for s in Sampler(40, torch.device("cpu"), seed=3, cpu_kernels=cpu_kernel).sample(
                logits.expand(rows, 40).clone(), seqs, []
            )
        ]
    )
    counts = torch.bincount(drawn, minlength=40).double()
    expected = torch.softmax(logits.double() / 0.5, dim=-1)
    spread = (rows * expected * (1 - expected)).sqrt()
    assert ((counts - rows * expected).abs() <= 4 * spread + 1e-9).all(), counts
    assert counts[[t for t in range(40) if t not in mass]].sum() == 0
