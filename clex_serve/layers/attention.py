"""Self-attention shared by every architecture: projections, rotary, CLEX log scale, paged KV cache.

The module owns no cache tensors of its own: the step's metadata carries every layer's views of the one
preallocated pool, and the backend that reads and writes them; ``layer_index`` picks this layer's. The backend
also applies the rotary tables and the log scale of ``meta`` (``rotate_queries_and_keys``), so that a CUDA
backend can do it in the same kernel that writes the cache.
"""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.config import ModelConfig
from clex_serve.layers.linear import PackedLinear


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = PackedLinear(
            hidden,
            {"q_proj": self.num_heads * self.head_dim, "k_proj": kv_size, "v_proj": kv_size},
            bias=config.qkv_bias,
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)
        self.layer_index = 0  # set by the decoder stack that holds the layer

    def forward(self, hidden_states: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        q, k, v = self.qkv_proj.forward_split(hidden_states)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = meta.kv_caches[self.layer_index]
        out = meta.backend.forward(q, k, v, k_cache, v_cache, meta)
        return self.o_proj(out)
