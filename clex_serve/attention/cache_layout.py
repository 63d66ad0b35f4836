"""What an attention backend needs of the KV cache, declared once by the backend: the pool's layout and where
the block manager places each sequence's blocks.

Plain Python, no tensors: the block manager reads it as the engine builds it, the KV pool and the model
runner where they are made; no step asks again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheLayout:
    # The pool per layer as [kv_heads, slots, head_dim] (a run of slots is one contiguous stretch per head),
    # else paged [blocks, block_size, kv_heads, head_dim], which flash-attn and the Triton decode read.
    head_major: bool = False
    # The block manager places each sequence's blocks one after the other where it can, for attention that
    # reads runs of consecutive blocks in place; else it hands out the block freed longest ago.
    contiguous_sequences: bool = False


PAGED = CacheLayout()
# Attention that reads each sequence's cache run by run (``attention.cpu``).
RUNS = CacheLayout(head_major=True, contiguous_sequences=True)
