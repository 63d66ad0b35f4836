"""The KV cache: one preallocated pool of blocks shared by all sequences; layers hold views into it.

Layout ``[layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]``: a block of one layer is
``block_size`` consecutive token slots, which is the paged layout flash-attn and the Triton decode read.
For attention that reads runs of consecutive slots in place (``attention.cpu``, whose ``cache_layout``
says so), the pool is head-major instead, ``[layers, 2, kv_heads, blocks * block_size, head_dim]``: a run
of slots is then one contiguous stretch per head, which the fused CPU attention reads about 1.7x faster
than the same keys strided across heads. Either way ``flat_keys`` / ``flat_slots`` give a
``[slots, kv_heads, head_dim]`` view, and slot ``block * block_size + offset`` means the same. Keys are stored
rotated with the scale of their sequence (see ``cache_rotation``); there is exactly one K and one V per token
and layer. One block more than the block manager hands out is kept as the padding block: rows that pad a
CUDA graph's batch write their K/V there and read only it, so they never touch a sequence's blocks.
"""

from __future__ import annotations

import torch

from clex_serve.attention.metadata import cache_slot, flat_slots
from clex_serve.config import ModelConfig
from clex_serve.kernels.huge_pages import HugePageArena


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


class KVCachePool:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        head_major: bool = False,
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; give it more memory")
        self.num_blocks = num_blocks  # usable blocks, 0 .. num_blocks - 1
        self.padding_block = num_blocks
        self.block_size = block_size
        self.head_major = head_major
        layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        shape = (
            (layers, 2, heads, (num_blocks + 1) * block_size, head_dim)
            if head_major
            else (layers, 2, num_blocks + 1, block_size, heads, head_dim)
        )
        if device.type == "cpu":  # read by every decode step: in 2 MB pages (huge_pages), touched now
            self.tensor = HugePageArena().empty(shape, dtype).zero_()
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        # Every layer's (K, V) views, made once: a step's metadata hands them to the layers.
        self.layer_views = [(self.tensor[layer, 0], self.tensor[layer, 1]) for layer in range(layers)]
        # The same as [slots, kv_heads, head_dim] views, for kernels that take slots in either layout.
        self.flat_layer_views = [(flat_slots(k), flat_slots(v)) for k, v in self.layer_views]

    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]

    def keys(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 1]

    def flat_keys(self, layer: int) -> torch.Tensor:
        """[blocks * block_size, kv_heads, head_dim]: a key per slot (a view)."""
        return flat_slots(self.tensor[layer, 0])

    def copy_blocks(self, sources: list[int], destinations: list[int]) -> None:
        """Copy whole blocks (every layer, K and V)."""
        device = self.tensor.device
        if not self.head_major:
            self.tensor[:, :, torch.tensor(destinations, device=device)] = self.tensor[
                :, :, torch.tensor(sources, device=device)
            ]
            return
        offsets = torch.arange(self.block_size, device=device)

        def slots(blocks: list[int]) -> torch.Tensor:
            return (torch.tensor(blocks, device=device)[:, None] * self.block_size + offsets).reshape(-1)

        self.tensor[:, :, :, slots(destinations)] = self.tensor[:, :, :, slots(sources)]

    def slot(self, block_table: list[int], position: int) -> int:
        return cache_slot(block_table, position, self.block_size)

    @property
    def padding_slot(self) -> int:
        return cache_slot([self.padding_block], 0, self.block_size)
