"""KV cache blocks: who owns which block, which are free, and (optionally) which hold a reusable prefix.

Plain Python, no tensors: the model runner moves data, this decides where it goes.

Prefix caching under CLEX: a block's keys and values depend on the tokens up to it *and* on the scale of
the pass that computed them (and, with log_scale, that pass's length). A block is therefore registered
under a hash of (previous block's hash, its tokens, the scale key of the prompt pass), and a new prompt
reuses it only when a fresh prefill of that prompt would run at the same scale key. When a sequence's
scale changes its keys are re-rotated in place: its shared blocks are copied first (copy on write) and
its registered blocks leave the prefix index, since they no longer hold what their hash says.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Hashable
from typing import NamedTuple

from clex_serve.attention.cache_layout import PAGED, CacheLayout
from clex_serve.engine.core.sequence import Sequence


def block_runs(block_table: list[int]) -> list[list[int]]:
    """``[first_block, count]`` for each stretch of consecutive blocks of a table."""
    runs: list[list[int]] = []
    for block in block_table:
        extend_block_runs(runs, block)
    return runs


def extend_block_runs(runs: list[list[int]], block: int) -> None:
    """``runs`` after ``block`` is appended to their table: the last run grows when the block follows it."""
    if runs and runs[-1][0] + runs[-1][1] == block:
        runs[-1][1] += 1
    else:
        runs.append([block, 1])


class PrefixKey(NamedTuple):
    """What a prompt pass computes its cache under: the rotary scale, and its length when log_scale is on."""

    scale: int
    length: int | None


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, layout: CacheLayout = PAGED
    ) -> None:
        """``layout``: what the attention backend declared it needs of the cache; with
        ``contiguous_sequences``, sequences are placed so that their blocks follow each other in the pool
        where possible (for attention that reads runs of consecutive blocks in place)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.keep_sequences_contiguous = layout.contiguous_sequences
        self.ref_counts = [0] * num_blocks
        # Free blocks in the order they were freed: allocation takes the oldest, so recently freed
        # prefix blocks stay reusable longest, except that a sequence's next block is the one after its
        # last when that one is free: consecutive blocks are one view of the pool, which attention that
        # reads runs reads in place. Each table's runs are kept with it (``Sequence.block_runs``).
        self._free: OrderedDict[int, None] = OrderedDict((block, None) for block in range(num_blocks))
        # Keeping sequences contiguous, a sequence that cannot continue after its last block (or a new
        # one) starts in the middle of the longest run of free blocks, which leaves room to grow on both
        # sides of it: streams decoding side by side then each extend their own run instead of taking
        # turns over consecutive blocks. One byte per block, 1 = free, searched at C speed.
        self._free_map = bytearray(b"\x01" * num_blocks)
        self._hash_of_block: dict[int, Hashable] = {}
        self._block_of_hash: dict[Hashable, int] = {}
        self.prefix_hits = 0  # tokens served from the prefix cache, for metrics and tests
        self.prefix_hit_blocks = 0
        self.prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- allocation

    def _prefix_hashes(self, seq: Sequence, cache_key: PrefixKey) -> list[Hashable]:
        """Hashes of the prompt's full blocks, leaving at least one prompt token to compute (its logits)."""
        usable = (seq.num_prompt_tokens - 1) // self.block_size
        hashes, previous = [], None
        for index in range(usable):
            tokens = tuple(seq.prompt_token_ids[index * self.block_size : (index + 1) * self.block_size])
            previous = hash((previous, tokens, cache_key))
            hashes.append(previous)
        return hashes

    def _cached_prefix(self, seq: Sequence, cache_key: PrefixKey | None) -> list[int]:
        if not self.enable_prefix_caching or cache_key is None:
            return []
        blocks = []
        for block_hash in self._prefix_hashes(seq, cache_key):
            block = self._block_of_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, seq: Sequence, cache_key: PrefixKey | None = None) -> bool:
        hits = self._cached_prefix(seq, cache_key)
        revived = sum(1 for block in hits if self.ref_counts[block] == 0)
        return self.blocks_for(len(seq)) - len(hits) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, cache_key: PrefixKey | None = None) -> None:
        """Blocks for every token of ``seq``; reused prefix blocks count as already computed."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        hits = self._cached_prefix(seq, cache_key)
        if self.enable_prefix_caching and cache_key is not None:
            self.prefix_queried_tokens += seq.num_prompt_tokens
        for block in hits:
            self._take(block)
        seq.block_table = list(hits)
        wanted = self.blocks_for(len(seq)) - len(hits)
        for taken in range(wanted):
            seq.block_table.append(
                self._take_free(seq.block_table[-1] + 1 if seq.block_table else None, wanted - taken)
            )
        seq.block_runs = block_runs(seq.block_table)
        seq.num_cached_tokens = len(hits) * self.block_size
        if hits:
            seq.cache_scale = cache_key.scale  # the reused keys are rotated with it
        self.prefix_hits += seq.num_cached_tokens
        self.prefix_hit_blocks += len(hits)

    def append(self, seq: Sequence, new_len: int) -> None:
        while len(seq.block_table) < self.blocks_for(new_len):
            block = self._take_free(seq.block_table[-1] + 1 if seq.block_table else None)
            seq.block_table.append(block)
            extend_block_runs(seq.block_runs, block)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first ``num_tokens`` tokens' (those that only held rejected drafts)."""
        keep = self.blocks_for(num_tokens)
        if len(seq.block_table) <= keep:
            return
        for block in reversed(seq.block_table[keep:]):
            self._release(block)
        del seq.block_table[keep:]
        seq.block_runs = block_runs(seq.block_table)

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free[block] = None
            self._free_map[block] = 1

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.block_runs = []
        seq.num_cached_tokens = 0
        seq.cache_scale = 1

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._free[block]
            self._free_map[block] = 0
        self.ref_counts[block] += 1

    def _take_free(self, preferred: int | None = None, run_length: int = 1) -> int:
        """A free block: ``preferred`` when it is free, else (keeping sequences contiguous) the start of
        ``run_length`` blocks centred in the longest free run, else the one freed longest ago."""
        if not self._free:
            raise RuntimeError("out of KV cache blocks: the scheduler should have checked")
        if preferred in self._free:
            block = preferred
            del self._free[block]
        elif self.keep_sequences_contiguous:
            block = self._centred_in_longest_free_run(run_length)
            del self._free[block]
        else:
            block, _ = self._free.popitem(last=False)
        self._free_map[block] = 0
        self._forget(block)  # a recycled block's old contents are gone
        self.ref_counts[block] = 1
        return block

    def _centred_in_longest_free_run(self, run_length: int) -> int:
        longest = max(re.finditer(rb"\x01+", self._free_map), key=lambda run: run.end() - run.start())
        return longest.start() + max(0, longest.end() - longest.start() - run_length) // 2

    # ---------------------------------------------------------------- prefix index

    def register_prompt_blocks(self, seq: Sequence, cache_key: PrefixKey | None) -> None:
        """After the prompt pass: publish its full prompt blocks for reuse."""
        if not self.enable_prefix_caching or cache_key is None:
            return
        for index, block_hash in enumerate(self._prefix_hashes(seq, cache_key)):
            block = seq.block_table[index]
            if block_hash in self._block_of_hash or block in self._hash_of_block:
                continue
            self._block_of_hash[block_hash] = block
            self._hash_of_block[block] = block_hash

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of_block.pop(block, None)
        if block_hash is not None:
            del self._block_of_hash[block_hash]

    def prepare_rescale(self, seq: Sequence) -> list[tuple[int, int]]:
        """Before ``seq``'s cached keys are re-rotated in place: unshare and unpublish its blocks.

        Returns (source, destination) block copies the runner must make first.
        """
        copies = []
        for index in range(self.blocks_for(seq.num_cached_tokens)):
            block = seq.block_table[index]
            if self.ref_counts[block] > 1:
                fresh = self._take_free()
                self.ref_counts[block] -= 1
                seq.block_table[index] = fresh
                copies.append((block, fresh))
            else:
                self._forget(block)
        if copies:
            seq.block_runs = block_runs(seq.block_table)
        return copies

    def free_blocks_needed_for_rescale(self, seq: Sequence) -> int:
        return sum(
            1 for index in range(self.blocks_for(seq.num_cached_tokens)) if self.ref_counts[seq.block_table[index]] > 1
        )
