"""A Llama-family decoder layer computed by one C++ call on CPU decode steps (``csrc/decoder_layer.cpp``).

It runs the kernels the layer-by-layer path runs, in the same order, so the results are the same bit for
bit; it only takes Python out of the step, which on a small model was as long as reading the weights.
``device_layers`` swaps it in once for each layer it fits: a gated silu MLP, RMSNorms, linear layers in
the blocked layout (``cpu_linear``), head shapes the decode kernel takes, under the CPU attention backend
with the kernels. Per step it applies to pure decode steps that the blocked kernel takes in one call (at
most ``BLOCKED_MAX_ROWS`` streams); anything else (prompt chunks, mixed steps, bfloat16 batches past the
blocked kernel's rows, where oneDNN runs, another runner's backend over the same model) takes the
layer-by-layer path. The runner's whole-step call (``cpu_decode_step``) makes the same call from C++ for
every layer of a pure decode step, so this module's ``forward`` serves the steps that call does not take.
"""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.attention.cpu import RUN_PLAN, RunPlan, decode_kernel_fits
from clex_serve.attention.metadata import AttentionMetadata, flat_slots
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_layers import CpuRMSNorm, CpuSiluAndMul
from clex_serve.kernels.cpu_linear import CpuLinear
from clex_serve.layers.mlp import GatedMLP
from clex_serve.models.llama import LlamaDecoderLayer


def decode_layer_weights(layer: LlamaDecoderLayer) -> cpu_ops.DecodeLayerWeights | None:
    """The layer's fixed arguments to the fused call, or None where the fused layer does not fit it."""
    attention, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not isinstance(mlp, GatedMLP) or not isinstance(mlp.act_and_mul, CpuSiluAndMul):
        return None
    if not all(isinstance(norm, CpuRMSNorm) for norm in norms) or norms[0].eps != norms[1].eps:
        return None
    linears = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if not all(isinstance(linear, CpuLinear) and linear.blocked_weight is not None for linear in linears):
        return None
    dtype = attention.qkv_proj.blocked_weight.dtype
    if any(norm.weight.dtype != dtype for norm in norms):
        return None
    if not decode_kernel_fits(attention.head_dim, attention.num_heads, attention.num_kv_heads):
        return None
    qkv, o, gate_up, down = linears
    return cpu_ops.DecodeLayerWeights(
        norms[0].weight,
        norms[1].weight,
        norms[0].eps,
        qkv.blocked_weight,
        qkv.blocked_bias,
        o.blocked_weight,
        o.blocked_bias,
        gate_up.blocked_weight,
        gate_up.blocked_bias,
        down.blocked_weight,
        down.blocked_bias,
        attention.num_heads,
        attention.num_kv_heads,
        attention.head_dim,
        down.out_features,
        down.in_features,
    )


class CpuLlamaDecoderLayer(LlamaDecoderLayer):
    """The layer it replaces, with the same modules, and a pure decode step in one call."""

    def __init__(self, layer: LlamaDecoderLayer, weights: cpu_ops.DecodeLayerWeights) -> None:
        nn.Module.__init__(self)  # LlamaDecoderLayer's own would build new modules: these are the layer's
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.weights = weights
        linears = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        self.max_rows = min(linear.max_blocked_rows for linear in linears)

    @classmethod
    def replacing(cls, layer: nn.Module) -> CpuLlamaDecoderLayer | None:
        if type(layer) is not LlamaDecoderLayer:
            return None
        weights = decode_layer_weights(layer)
        return cls(layer, weights) if weights is not None else None

    def forward(self, hidden_states: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        plan: RunPlan | None = meta.backend_state.get(RUN_PLAN)
        if (
            plan is None
            or not plan.every_sequence_decodes()
            or hidden_states.dim() != 2
            or hidden_states.shape[0] > self.max_rows
            or hidden_states.dtype != self.weights.input_norm.dtype
        ):
            return super().forward(hidden_states, meta)
        scale = meta.query_scale.flatten() if meta.query_scale is not None else None
        k_cache, v_cache = meta.kv_caches[self.self_attn.layer_index]
        return cpu_ops.llama_decode_layer(
            hidden_states.contiguous(),
            self.weights,
            meta.cos,
            meta.sin,
            scale,
            meta.slot_mapping,
            flat_slots(k_cache),
            flat_slots(v_cache),
            plan.decodes.runs,
            plan.decodes.offsets,
            plan.decodes.row_groups,
        )
