"""A pure decode step of a fused Llama-family model on the CPU, from the token ids to the logits, without the
layer-by-layer machinery: the CPU's counterpart of ``DecodeCudaGraphs``.

With every layer one C++ call (``cpu_decode_layer``), a small model's decode step still spent about a sixth of
its time in Python around those calls: the step's ``AttentionMetadata`` (a dozen tensors, most of them unread
by the fused layers), the backend's plan, nine module calls and their checks, the head's gather of last
rows. A decode step makes no decision that depends on the data, so the runner hands such steps here, where
only what the fused layers read is built: the ids, the new tokens' slots, the rotary rows, the log scale, and
each sequence's slot runs. The calls are those the layer-by-layer path makes, with the same arguments, so
the logits are the same bit for bit (tested).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from clex_serve.attention import segments
from clex_serve.attention.cpu import CpuAttentionBackend
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_decode_layer import CpuLlamaDecoderLayer
from clex_serve.kernels.cpu_layers import CpuRMSNorm
from clex_serve.kernels.cpu_linear import CpuLinear
from clex_serve.models.base import CausalLM, DecoderModel


class CpuDecodeStep:
    """Decode steps of ``model`` (prepared for the CPU) with every layer fused; ``for_model`` says whether it
    applies."""

    def __init__(self, model: CausalLM) -> None:
        self.embedding = model.model.embed_tokens.weight
        self.layers: list[cpu_ops.DecodeLayerWeights] = [layer.weights for layer in model.model.layers]
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.max_rows = min(
            min(layer.max_rows for layer in model.model.layers),
            model.lm_head.max_blocked_rows,
        )

    @classmethod
    def for_model(cls, model: nn.Module, backend: object) -> CpuDecodeStep | None:
        """The fast path for a model whose decode step is the base one (embedding, layers, final norm, head,
        none of them overridden) with every layer fused, under the CPU backend with its kernels; else None."""
        if not isinstance(model, CausalLM) or not isinstance(model.model, DecoderModel):
            return None
        if type(model).forward is not CausalLM.forward or type(model).compute_logits is not CausalLM.compute_logits:
            return None
        if type(model.model).forward is not DecoderModel.forward or type(model.model.embed_tokens) is not nn.Embedding:
            return None
        if not isinstance(backend, CpuAttentionBackend) or not backend.kernels:
            return None
        if not all(isinstance(layer, CpuLlamaDecoderLayer) for layer in model.model.layers):
            return None
        norm, head = model.model.norm, model.lm_head
        if type(norm) is not CpuRMSNorm or type(head) is not CpuLinear or head.blocked_weight is None:
            return None
        dtype = model.model.layers[0].weights.input_norm.dtype
        if norm.weight.dtype != dtype or model.model.embed_tokens.weight.dtype != dtype:
            return None
        return cls(model)

    def fits(self, steps: list) -> bool:
        """Every sequence decodes one token at its own length, and the fused calls take the batch in one."""
        return len(steps) <= self.max_rows and all(step.is_plain_decode for step in steps)

    def logits(self, steps: list, scales: list[int], runner) -> torch.Tensor:
        """[B, vocab] float32 next-token logits of ``steps`` (``fits``), with the runner's pool and rotary."""
        pool = runner.kv_cache
        block_size = runner.block_size
        positions, slots, runs, counts = [], [], [], []
        for step in steps:
            if len(step.block_table) * block_size < step.total_len:
                raise ValueError("block table too short for the sequence: allocate blocks before running")
            position = step.num_cached
            positions.append(position)
            slots.append(pool.slot(step.block_table, position))
            if step.block_runs is not None:
                own = segments.slot_runs(step.block_runs, step.total_len, block_size)
            else:
                own = segments.contiguous_runs(step.block_table, step.total_len, block_size)
            runs.extend(own)
            counts.append(len(own))
        positions_t = torch.tensor(positions, dtype=torch.long)
        ones = torch.ones(len(steps), dtype=torch.long)
        cos, sin = runner._rotary_tables(positions_t, scales, ones)
        query_scale = runner._query_scale(steps, positions_t, ones)
        scale = query_scale.flatten() if query_scale is not None else None
        slots_t = torch.tensor(slots, dtype=torch.long)
        runs_t = torch.tensor(runs, dtype=torch.long)
        offsets_t = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.long)
        hidden = nn.functional.embedding(torch.tensor([step.token_ids[0] for step in steps]), self.embedding)
        for weights, (k_cache, v_cache) in zip(self.layers, pool.flat_layer_views):
            hidden = cpu_ops.llama_decode_layer(
                hidden, weights, cos, sin, scale, slots_t, k_cache, v_cache, runs_t, offsets_t, None
            )
        hidden = cpu_ops.rms_norm(hidden, None, self.norm.weight, self.norm.eps)[0]
        return self.lm_head(hidden).float()
