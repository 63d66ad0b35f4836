"""What every attention backend offers the model runner, and what it declares once about the cache.

A backend is chosen once per model (``selector``). The runner reads its declarations where it builds things:
``cache_layout`` for the KV pool and the block manager, ``reads_block_tables`` for the step's metadata,
``supports_cuda_graphs`` for decode graphs. Per step it calls ``prepare`` once (work shared by every layer,
kept in ``meta.backend_state``), then each layer calls ``forward``.
"""

from __future__ import annotations

import torch

from clex_serve.attention.cache_layout import PAGED, CacheLayout
from clex_serve.attention.metadata import AttentionMetadata


class AttentionBackend:
    name: str
    supports_cuda_graphs = False  # a decode step uses no host value that changes per step
    cache_layout: CacheLayout = PAGED
    reads_block_tables = True  # reads ``meta.block_tables``; others plan from the host tables

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers; nothing by default."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] (the step's new tokens, not yet rotated) -> [N, Hq * D]; rotates q and
        k with the step's tables and writes k and v to their cache slots first."""
        raise NotImplementedError
