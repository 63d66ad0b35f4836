"""The KV cache: one preallocated pool of blocks shared by all sequences; layers hold views into it.

Layout ``[layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]``: a block of one layer is
``block_size`` consecutive token slots, which is the paged layout flash-attn reads. Keys are stored rotated
with the scale of their sequence (see ``cache_rotation``); there is exactly one K and one V per token and
layer. One block more than the block manager hands out is kept as the padding block: rows that pad a
CUDA graph's batch write their K/V there and read only it, so they never touch a sequence's blocks.
"""

from __future__ import annotations

import torch

from clex_serve.attention.metadata import cache_slot
from clex_serve.config import ModelConfig


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


class KVCachePool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; give it more memory")
        self.num_blocks = num_blocks  # usable blocks, 0 .. num_blocks - 1
        self.padding_block = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(
            config.num_hidden_layers, 2, num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim,
            dtype=dtype, device=device,
        )

    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]

    def keys(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 1]

    def flat_keys(self, layer: int) -> torch.Tensor:
        """[blocks * block_size, kv_heads, head_dim]: a key per slot."""
        return self.tensor[layer, 0].view(-1, *self.tensor.shape[-2:])

    def slot(self, block_table: list[int], position: int) -> int:
        return cache_slot(block_table, position, self.block_size)

    @property
    def padding_slot(self) -> int:
        return cache_slot([self.padding_block], 0, self.block_size)
