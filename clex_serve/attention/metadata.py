"""What one forward step tells attention: where each new token's K/V goes and what each query may see.

Built once per step by the model runner and shared by every layer. Positions, block tables and the rotary
tables are per step, never per layer. It is also the step's forward context: the KV cache views of every
layer and the attention backend come with it, so that layers hold no cache and no runner is "bound" to a
model (two runners over one model, as tests use, each pass their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def cache_slot(block_table, position, block_size: int):
    """The flat cache slot of ``position``: its block (looked up in the block table) times ``block_size``,
    plus its offset in the block. The one place this arithmetic lives. Takes a list and an int, a 1-D
    table tensor with positions of any shape, or a [B, max_blocks] table with [B, L] positions (each row's
    positions in its own table)."""
    block_index = position // block_size
    if isinstance(block_table, torch.Tensor) and block_table.dim() == 2:
        blocks = block_table.gather(1, block_index)
    else:
        blocks = block_table[block_index]
    return blocks * block_size + position % block_size


def flat_slots(cache: torch.Tensor) -> torch.Tensor:
    """A layer's K or V cache as a ``[slots, kv_heads, head_dim]`` view, in either layout: slot-major caches
    are 4-D ``[blocks, block_size, kv_heads, head_dim]``, head-major ones 3-D ``[kv_heads, slots, head_dim]``."""
    if cache.dim() == 3:
        return cache.transpose(0, 1)
    return cache.view(-1, *cache.shape[-2:])


@dataclass
class AttentionMetadata:
    # One entry per new token of the step (all sequences' tokens concatenated).
    positions: torch.Tensor  # [N] absolute position of each new token
    slot_mapping: torch.Tensor  # [N] flat cache slot (block * block_size + offset) of each new token
    cos: torch.Tensor  # [N, rotary_dim] in the model dtype, already at each sequence's scale
    sin: torch.Tensor
    query_scale: torch.Tensor | None  # [N, 1, 1] CLEX log_scale factor of each query, or None
    # One entry per sequence.
    query_lens: list[int]  # new tokens per sequence
    context_lens_host: list[int]  # tokens in the cache after the step, per sequence
    context_lens: torch.Tensor  # [B] int32, the same on the device
    # [B, max_blocks] int32, padded with 0; None for backends that plan from the host tables below
    # (``reads_block_tables`` False), so that no step builds a tensor that grows with the context.
    block_tables: torch.Tensor | None
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    block_size: int
    is_decode: bool  # every sequence has exactly one new token
    # The block tables as Python lists, where the runner has them (backends that plan on the host use them).
    block_tables_host: list[list[int]] | None = None
    # Each table as [first_block, count] runs where the block manager keeps them (None entries: not kept),
    # for backends that read the cache run by run.
    block_runs_host: list[list[list[int]] | None] | None = None
    # Sequences run as rows of one sequence (a verify step's drafts, each a decode of its own): group sizes
    # over the step's sequences in order (1 for a sequence alone), or None when every sequence is alone.
    # Rows of a group are consecutive positions over the same cache; a backend may read it once for them.
    row_groups: list[int] | None = None
    # What the backend's ``prepare`` works out once per step for every layer, under keys of its own.
    backend_state: dict[str, Any] = field(default_factory=dict)
    # The forward context: (K, V) cache views by layer index, and the backend that reads and writes them.
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    backend: Any = None

    @property
    def num_sequences(self) -> int:
        return len(self.query_lens)
