"""A linear layer that packs several projections of the same input into one matrix multiplication.

Checkpoints store the projections apart (``q_proj``, ``k_proj``, ``v_proj``; ``gate_proj``, ``up_proj``);
the loader fills each one's rows of the packed weight through ``checkpoint_tensors``.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Linear):
    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_sizes = dict(shards)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint name (relative to the parent module) -> the rows of this layer's tensors it fills."""
        views, offset = {}, 0
        for name, size in self.shard_sizes.items():
            views[f"{name}.weight"] = self.weight[offset : offset + size]
            if self.bias is not None:
                views[f"{name}.bias"] = self.bias[offset : offset + size]
            offset += size
        return views

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(list(self.shard_sizes.values()), dim=-1)
