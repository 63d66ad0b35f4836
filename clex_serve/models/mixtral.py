"""Mixtral: the Llama decoder layer with a sparse mixture of experts in place of the MLP."""

from __future__ import annotations

from clex_serve.config import ModelConfig
from clex_serve.layers.moe import SparseMoE
from clex_serve.layers.norm import RMSNorm
from clex_serve.models.base import CausalLM, DecoderModel
from clex_serve.models.llama import LlamaDecoderLayer


class MixtralDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig) -> None:
        moe = SparseMoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            config.hidden_act,
        )
        super().__init__(config, moe)


class MixtralForCausalLM(CausalLM):
    weight_renames = CausalLM.weight_renames + (
        (".block_sparse_moe.", ".mlp."),
        (".w1.", ".gate_proj."),
        (".w3.", ".up_proj."),
        (".w2.", ".down_proj."),
    )
    # The experts a step runs are chosen on the host (SparseMoE loops over the routed ones): decode stays eager.
    supports_cuda_graphs = False

    def __init__(self, config: ModelConfig) -> None:
        layers = [MixtralDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        super().__init__(config, DecoderModel(config, layers, RMSNorm(config.hidden_size, config.norm_eps)))
