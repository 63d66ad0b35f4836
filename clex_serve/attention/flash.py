"""Attention over the paged KV cache with flash-attn (CUDA only, optional extra ``clex-serve[cuda]``).

flash-attn reads the block tables itself, so nothing is gathered. Its paged kernels need a block size that
is a multiple of 256; the engine picks such a block size when this backend is chosen.
"""

from __future__ import annotations

import torch

from clex_serve.attention.backend import AttentionBackend
from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.attention.sdpa import rotate_queries_and_keys, write_kv

FLASH_BLOCK_SIZE = 256


class FlashAttentionBackend(AttentionBackend):
    name = "flash-attn"
    supports_cuda_graphs = True  # decode reads cache_seqlens and block tables on the device

    def __init__(self, sliding_window: int | None) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache
        # flash-attn's window (left, right) counts keys before the query; transformers' window includes it.
        self.window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)

    def prepare(self, meta: AttentionMetadata) -> None:
        if not meta.is_decode:
            cu_k = torch.zeros(meta.num_sequences + 1, dtype=torch.int32, device=meta.context_lens.device)
            cu_k[1:] = torch.cumsum(meta.context_lens, 0)
            meta.backend_state["cu_seqlens_k"] = cu_k

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k = rotate_queries_and_keys(q, k, meta)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.is_decode:
            out = self._with_kvcache(
                q[:, None],
                k_cache,
                v_cache,
                cache_seqlens=meta.context_lens,
                block_table=meta.block_tables,
                causal=True,
                window_size=self.window,
            )[:, 0]
        else:
            out = self._varlen(
                q,
                k_cache,
                v_cache,
                cu_seqlens_q=meta.cu_seqlens_q,
                cu_seqlens_k=meta.backend_state["cu_seqlens_k"],
                max_seqlen_q=max(meta.query_lens),
                max_seqlen_k=max(meta.context_lens_host),
                causal=True,
                window_size=self.window,
                block_table=meta.block_tables,
            )
        return out.reshape(q.shape[0], -1)
