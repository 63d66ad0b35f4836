"""The demo model: transformers' ``LlamaForCausalLM`` with its rotary embedding swapped for ``TrainingRotary``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clex_serve.train.clex_rotary import TrainingRotary


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    base_len: int = 128  # L0: the training length, max_position_embeddings of the saved config
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True  # halves the embedding share of a small model's size
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim (hidden_size / num_heads) must be even for rotary embeddings")
        for name in ("vocab_size", "intermediate_size", "num_layers", "base_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.base_len,
            rope_theta=self.rope_theta,
            rms_norm_eps=1e-5,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            attention_dropout=0.0,
            attn_implementation="sdpa",
        )


def build_model(shape: ModelShape, use_clex: bool, seed: int):
    """A freshly initialised model; the same seed gives the same transformer weights with and without CLEX."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.llama_config())
    model.model.rotary_emb = TrainingRotary(shape.head_dim, shape.rope_theta, use_clex)
    return model


def rotary_of(model) -> TrainingRotary:
    return model.model.rotary_emb
