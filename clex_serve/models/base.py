"""What every architecture shares: embeddings, the decoder stack, the final norm, the LM head, the rotary.

A model sees ``(input_ids, metadata)`` for the new tokens of a step and returns their hidden states;
batching, paging and CLEX scales live in the engine. Subclasses choose the decoder layer and final norm.
"""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.config import ModelConfig
from clex_serve.layers.rotary import get_rope


class DecoderModel(nn.Module):
    """The ``model.`` prefix of a causal LM checkpoint."""

    def __init__(self, config: ModelConfig, layers: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        # Given an uninitialised weight, Embedding skips its random init: the checkpoint fills it anyway, and on
        # the meta device that init alone would cost seconds of imports at start-up.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(layers)
        for index, layer in enumerate(layers):
            layer.self_attn.layer_index = index  # which of the step's cache views is this layer's
        self.norm = norm
        self.rotary_emb = get_rope(config)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, meta)
        return self.norm(hidden_states)


class CausalLM(nn.Module):
    # (checkpoint prefix, our prefix) pairs applied to weight names at load time.
    weight_renames: tuple[tuple[str, str], ...] = (("model.clex_layer.", "model.rotary_emb."),)
    lm_head_bias = False
    # A decode step makes no host-side decision that depends on the data, so it can be a CUDA graph.
    supports_cuda_graphs = True

    def __init__(self, config: ModelConfig, model: DecoderModel) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=self.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def rotary_emb(self):
        return self.model.rotary_emb

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)
