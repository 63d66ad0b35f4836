"""The Llama family: Llama-2 (and CLEX-Llama), Mistral (sliding window), Qwen2 (q/k/v biases)."""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.config import ModelConfig
from clex_serve.layers.attention import Attention
from clex_serve.layers.mlp import GatedMLP
from clex_serve.layers.norm import RMSNorm
from clex_serve.models.base import CausalLM, DecoderModel


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = mlp

    def forward(self, hidden_states: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        attention_out = self.self_attn(self.input_layernorm(hidden_states), meta)
        normed, hidden_states = self.post_attention_layernorm(attention_out, residual=hidden_states)
        return hidden_states + self.mlp(normed)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        layers = [
            LlamaDecoderLayer(
                config, GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
            )
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(config, DecoderModel(config, layers, RMSNorm(config.hidden_size, config.norm_eps)))
