"""A Llama-family decoder layer computed by one C++ call on CPU decode steps (``kernels/csrc/decoder_layer.cpp``).

It runs the kernels the layer-by-layer path runs, in the same order, so the results are the same bit for
bit; it only takes Python out of the step, which on a small model was as long as reading the weights. It
applies to pure decode steps of a layer with a gated silu MLP whose linear layers are in the blocked layout
(``kernels/cpu_linear``) and take that many rows; anything else (prompt chunks, MoE, other activations,
bfloat16 batches past the blocked kernel's rows, where oneDNN runs) takes the usual path.
"""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.attention.metadata import AttentionMetadata, flat_slots
from clex_serve.kernels.cpu_linear import BLOCKED_MAX_ROWS
from clex_serve.layers.mlp import GatedMLP
from clex_serve.layers.norm import RMSNorm

# The decode attention kernel's register limits (``attention.sdpa.decode_kernel_fits``).
_MAX_HEAD_DIM, _MAX_GROUP = 256, 16


def layer_arguments(layer: nn.Module) -> tuple | None:
    """The layer's fixed arguments to the fused call (weights, norms, shapes), or None where it does not apply.
    Kept on the layer once found; not cached when absent, since the linear layouts are prepared later."""
    cached = getattr(layer, "_fused_decode_arguments", None)
    if cached is not None:
        return cached
    attention, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not isinstance(mlp, GatedMLP) or not mlp.is_silu or not all(isinstance(norm, RMSNorm) for norm in norms):
        return None
    linears = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if any(getattr(linear, "blocked_weight", None) is None for linear in linears):
        return None
    dtype = attention.qkv_proj.blocked_weight.dtype
    if any(norm.weight.dtype != dtype for norm in norms) or norms[0].eps != norms[1].eps:
        return None
    if attention.head_dim > _MAX_HEAD_DIM or attention.num_heads // attention.num_kv_heads > _MAX_GROUP:
        return None
    weights = []
    for linear in linears:
        weights += [linear.blocked_weight, linear.blocked_bias]
    layer._fused_decode_arguments = (
        norms[0].weight, norms[1].weight, norms[0].eps, *weights, attention.num_heads, attention.num_kv_heads,
        attention.head_dim, mlp.down_proj.out_features, mlp.down_proj.in_features,
    )
    return layer._fused_decode_arguments


def fused_decode_layer(layer: nn.Module, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
    """The layer's output for a pure CPU decode step in one call, or None where the fused layer does not apply."""
    decode_runs = meta.backend_state.get("decode_runs")
    if (decode_runs is None or len(decode_runs[2]) != len(meta.query_lens) or hidden.dim() != 2
            or hidden.shape[0] > BLOCKED_MAX_ROWS.get(hidden.dtype, 0)):
        return None
    arguments = layer_arguments(layer)
    if arguments is None or arguments[0].dtype != hidden.dtype:
        return None
    attention = layer.self_attn
    scale = meta.query_scale.flatten() if meta.query_scale is not None else None
    runs, offsets, _ = decode_runs
    k_cache, v_cache = meta.kv_caches[attention.layer_index]
    return torch.ops.clex_cpu.llama_decode_layer(
        hidden.contiguous(), *arguments, meta.cos, meta.sin, scale, meta.slot_mapping,
        flat_slots(k_cache), flat_slots(v_cache), runs, offsets)
