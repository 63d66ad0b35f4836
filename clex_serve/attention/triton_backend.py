"""Attention for CUDA without flash-attn: SDPA for prefill, a paged Triton kernel for decode.

Prefill is one long matrix product per sequence, which PyTorch's SDPA (flash or memory-efficient kernels)
already runs near the hardware's limits. Decode reads the cache through the block tables with
``triton_decode.paged_decode_attention``, without gathering keys into a copy first, and uses no host value
that changes per step, so it can run inside a captured CUDA graph. Before it, one fused kernel rotates the
queries and keys and writes K/V into the cache (``kernels.rotary_cache``).
"""

from __future__ import annotations

import torch

from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.attention.sdpa import SdpaAttentionBackend
from clex_serve.attention.triton_decode import num_splits_for, paged_decode_attention
from clex_serve.kernels.rotary_cache import rotate_and_cache


class TritonAttentionBackend(SdpaAttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, sliding_window: int | None, num_multiprocessors: int) -> None:
        super().__init__(sliding_window)
        self.num_multiprocessors = num_multiprocessors

    def prepare(self, meta: AttentionMetadata) -> None:
        """Decode needs nothing per step beyond the metadata tensors (its kernel reads the paged layout through
        the block tables); prefill is SDPA's."""
        if not meta.is_decode:
            super().prepare(meta)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if not meta.is_decode:
            return super().forward(q, k, v, k_cache, v_cache, meta)
        q = rotate_and_cache(q, k, v, meta.cos, meta.sin, meta.query_scale, meta.slot_mapping, k_cache, v_cache)
        num_splits = num_splits_for(q.shape[0], k_cache.shape[-2], self.num_multiprocessors)
        out = paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, num_splits, self.sliding_window
        )
        return out.reshape(q.shape[0], -1)
