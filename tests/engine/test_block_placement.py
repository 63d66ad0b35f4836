"""Where the block manager puts sequences: under a layout that keeps sequences contiguous (CPU attention reads
runs of consecutive blocks in place), streams that grow side by side each keep a run of their own."""

import random

import pytest

from clex_serve import SamplingParams
from clex_serve.attention.cache_layout import PAGED, RUNS
from clex_serve.attention.segments import contiguous_runs
from clex_serve.engine.core.block_manager import BlockManager
from clex_serve.engine.core.sequence import Sequence
from helpers.sequences import make_sequence


def _grow_side_by_side(manager: BlockManager, streams: int, prompt_len: int, steps: int) -> list[Sequence]:
    seqs = [make_sequence(index, prompt_len) for index in range(streams)]
    for seq in seqs:
        manager.allocate(seq)
    for _ in range(steps):
        for seq in seqs:  # one token each per step, as a decode step does
            seq.token_ids.append(7)
            manager.append(seq, len(seq))
    return seqs


def _runs(seq: Sequence, block_size: int) -> int:
    return len(contiguous_runs(seq.block_table, len(seq), block_size))


@pytest.mark.parametrize("contiguous", [True, False])
def test_streams_decoding_side_by_side_keep_their_own_runs(contiguous):
    manager = BlockManager(num_blocks=1024, block_size=4, layout=RUNS if contiguous else PAGED)
    seqs = _grow_side_by_side(manager, streams=16, prompt_len=10, steps=120)
    runs = [_runs(seq, 4) for seq in seqs]
    if contiguous:
        assert max(runs) <= 2, runs
    else:  # first come, first served: the streams take turns over consecutive blocks
        assert min(runs) > 20, runs


def test_a_prompt_is_placed_in_one_run_centred_in_the_longest_free_one():
    manager = BlockManager(num_blocks=100, block_size=4, layout=RUNS)
    first = make_sequence(0, 44)  # 11 blocks in an empty pool of 100: blocks 44..54
    manager.allocate(first)
    assert first.block_table == list(range(44, 55))
    second = make_sequence(1, 8)  # the longest free run is now 55..99 (0..43 is shorter): centred, blocks 76, 77
    manager.allocate(second)
    assert second.block_table == [76, 77]


def test_free_blocks_stay_consistent_through_random_allocation_and_freeing():
    rng = random.Random(0)
    manager = BlockManager(num_blocks=64, block_size=4, layout=RUNS)
    live: list[Sequence] = []
    for step in range(400):
        if live and (rng.random() < 0.3 or manager.num_free_blocks < 8):
            manager.free(live.pop(rng.randrange(len(live))))
        elif rng.random() < 0.5 or not live:
            seq = make_sequence(step, rng.randint(1, 20))
            if manager.can_allocate(seq):
                manager.allocate(seq)
                live.append(seq)
        else:
            seq = rng.choice(live)
            seq.token_ids.append(3)
            if manager.blocks_for(len(seq)) - len(seq.block_table) <= manager.num_free_blocks:
                manager.append(seq, len(seq))
            else:
                seq.token_ids.pop()
        held = [block for seq in live for block in seq.block_table]
        assert len(held) == len(set(held))  # no block is handed out twice
        assert manager.num_free_blocks + len(held) == 64
        assert all(manager._free_map[block] == 0 for block in held)


@pytest.mark.parametrize("contiguous", [True, False])
def test_the_runs_kept_with_each_table_follow_every_change_to_it(contiguous):
    """Allocation with shared prefixes, growth, copy-on-write before a re-rotation and freeing, in a random
    order: each sequence's kept runs are always those of its table, and the slot runs made from them are
    what a full scan of the table gives, for any number of tokens."""
    from clex_serve.attention.segments import slot_runs
    from clex_serve.engine.core.block_manager import PrefixKey, block_runs

    rng = random.Random(0)
    manager = BlockManager(
        num_blocks=400, block_size=4, enable_prefix_caching=True, layout=RUNS if contiguous else PAGED
    )
    key = PrefixKey(scale=1, length=None)
    prompt = list(range(1, 30))
    live: list[Sequence] = []
    copied = 0
    for step in range(600):
        action = rng.random()
        if action < 0.15 and len(live) < 12:
            seq = Sequence(step, f"r{step}", 0, list(prompt[: rng.randint(8, 29)]), SamplingParams())
            manager.allocate(seq, key)
            seq.num_cached_tokens = len(seq)
            manager.register_prompt_blocks(seq, key)  # later prompts share these blocks
            live.append(seq)
        elif action < 0.25 and live:
            seq = live.pop(rng.randrange(len(live)))
            manager.free(seq)
        elif action < 0.3 and live:
            seq = rng.choice(live)
            copies = manager.prepare_rescale(seq)  # shared blocks replaced by fresh copies
            assert all(seq.block_table.count(destination) == 1 for _, destination in copies)
            copied += len(copies)
        elif live:
            seq = rng.choice(live)
            seq.token_ids += [7] * rng.randint(1, 6)
            manager.append(seq, len(seq))
            seq.num_cached_tokens = len(seq)
        for seq in live:
            assert seq.block_runs == block_runs(seq.block_table)
            tokens = rng.randint(1, len(seq))
            assert slot_runs(seq.block_runs, tokens, 4) == contiguous_runs(seq.block_table, tokens, 4)
    assert copied > 0  # shared blocks were replaced under the sequences
