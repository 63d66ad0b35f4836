"""Phi-2: partial rotary, biases everywhere, one LayerNorm feeding attention and MLP in parallel."""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.config import ModelConfig
from clex_serve.layers.attention import Attention
from clex_serve.layers.mlp import PhiMLP
from clex_serve.models.base import CausalLM, DecoderModel


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.mlp = PhiMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        return hidden_states + self.self_attn(normed, meta) + self.mlp(normed)


class PhiForCausalLM(CausalLM):
    weight_renames = CausalLM.weight_renames + (
        (".self_attn.dense.", ".self_attn.o_proj."),
        ("model.final_layernorm.", "model.norm."),
    )
    lm_head_bias = True

    def __init__(self, config: ModelConfig) -> None:
        layers = [PhiDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        super().__init__(config, DecoderModel(config, layers, norm))
