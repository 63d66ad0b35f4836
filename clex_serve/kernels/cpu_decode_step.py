"""A pure decode step of a fused Llama-family model on the CPU, from the token ids to the logits, in one C++
call (``csrc/decode_step.cpp``): the CPU's counterpart of ``DecodeCudaGraphs``.

With every layer one C++ call (``cpu_decode_layer``), a small model's decode step still spent about a sixth of
its time in Python around those calls: the step's ``AttentionMetadata`` (a dozen tensors, most of them unread
by the fused layers), the backend's plan, nine module calls a layer and their checks, the rotary rows, the
head's gather of last rows; and after each step's weights have streamed through the caches, that Python runs
cold. A decode step makes no decision that depends on the data, so the runner hands such steps here, where
only what the fused layers read is worked out (the new tokens' slots, each sequence's slot runs, the
frequencies at each scale, the log scale), in one tensor, and one call does the rest: the embedding, the
rotary rows with the operators of ``RotaryEmbedding.cos_sin``, the layers' calls, the final norm and the head.
The logits are those of the path through the modules bit for bit (tested).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import nn

from clex_serve.attention import segments
from clex_serve.attention.cpu import CpuAttentionBackend
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_decode_layer import CpuLlamaDecoderLayer
from clex_serve.kernels.cpu_layers import CpuRMSNorm
from clex_serve.kernels.cpu_linear import CpuLinear
from clex_serve.layers.rotary.base import RotaryEmbedding
from clex_serve.models.base import CausalLM, DecoderModel

if TYPE_CHECKING:
    from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep
    from clex_serve.engine.worker.sampler import RunSampling

# The sizes every layer shares, as the fused call takes them once for all.
SHARED_FIELDS = ("eps", "heads", "kv_heads", "head_dim", "hidden_size", "intermediate_size")


class CpuDecodeStep:
    """Decode steps of ``model`` (prepared for the CPU) with every layer fused; ``for_model`` says whether it
    applies."""

    def __init__(self, model: CausalLM) -> None:
        layers = [layer.weights for layer in model.model.layers]
        self.shape = layers[0]
        self.layer_tensors: list[torch.Tensor | None] = [
            getattr(weights, name) for weights in layers for name in cpu_ops.DECODE_STEP_LAYER_FIELDS
        ]
        self.embedding = model.model.embed_tokens.weight
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rope: RotaryEmbedding = model.model.rotary_emb
        self.max_rows = min(min(layer.max_rows for layer in model.model.layers), model.lm_head.max_blocked_rows)

    @classmethod
    def for_model(cls, model: nn.Module, backend: object) -> CpuDecodeStep | None:
        """The fast path for a model whose decode step is the base one (embedding, layers, final norm, head
        and rotary rows, none of them overridden) with every layer fused and of one shape, under the CPU
        backend with its kernels; else None."""
        if not isinstance(model, CausalLM) or not isinstance(model.model, DecoderModel):
            return None
        if type(model).forward is not CausalLM.forward or type(model).compute_logits is not CausalLM.compute_logits:
            return None
        if type(model.model).forward is not DecoderModel.forward or type(model.model.embed_tokens) is not nn.Embedding:
            return None
        if type(model.model.rotary_emb).cos_sin is not RotaryEmbedding.cos_sin:
            return None
        if not isinstance(backend, CpuAttentionBackend) or not backend.kernels:
            return None
        layers = list(model.model.layers)
        if not layers or not all(isinstance(layer, CpuLlamaDecoderLayer) for layer in layers):
            return None
        if any(
            getattr(layer.weights, name) != getattr(layers[0].weights, name)
            for layer in layers
            for name in SHARED_FIELDS
        ):
            return None
        norm, head = model.model.norm, model.lm_head
        if type(norm) is not CpuRMSNorm or type(head) is not CpuLinear or head.blocked_weight is None:
            return None
        dtype = layers[0].weights.input_norm.dtype
        if norm.weight.dtype != dtype or model.model.embed_tokens.weight.dtype != dtype:
            return None
        return cls(model)

    def _model_arguments(self) -> tuple:
        """What the fused calls take of the model, in their order: embedding to the head."""
        head = self.lm_head
        return (
            self.embedding,
            self.layer_tensors,
            self.shape,
            self.norm.weight,
            self.norm.eps,
            head.blocked_weight,
            head.blocked_bias,
            head.out_features,
        )

    def fits(self, steps: list[SequenceStep]) -> bool:
        """Every sequence decodes one token at its own length, and the fused calls take the batch in one."""
        return len(steps) <= self.max_rows and all(step.is_plain_decode for step in steps)

    def run(
        self,
        steps: list[SequenceStep],
        scales: list[int],
        runner: ModelRunner,
        count: int,
        sampling: RunSampling | None = None,
    ) -> torch.Tensor:
        """The tokens [count, B] of ``count`` decode steps from ``steps`` (``fits``) in one call, each step's
        tokens (the argmax, or sampled by ``sampling``) the next one's input; the block tables hold every
        position the run writes, and every step of a row runs at its scale in ``scales`` (the scheduler's
        ``decode_runs`` plans them so)."""
        pool = runner.kv_cache
        block_size = runner.block_size
        batch = len(steps)
        ids, positions, slots, lengths = [], [], [[] for _ in range(count)], [[] for _ in range(count)]
        runs, offsets = [], [[0] for _ in range(count)]
        for step in steps:
            if len(step.block_table) * block_size < step.total_len + count - 1:
                raise ValueError("block table too short for the decode run: allocate blocks before running")
            ids.append(step.token_ids[0])
            positions.append(step.num_cached)
        for j in range(count):
            for step in steps:
                slots[j].append(pool.slot(step.block_table, step.num_cached + j))
                lengths[j].append(step.rotary_len + j)
                own = segments.sequence_runs(step.block_runs, step.block_table, step.total_len + j, block_size)
                runs.extend(itertools.chain.from_iterable(own))
                offsets[j].append(offsets[j][-1] + len(own))
            if j + 1 < count:
                offsets[j + 1][0] = offsets[j][-1]
        packed = torch.tensor(ids + positions + list(itertools.chain(*slots, *offsets)) + runs, dtype=torch.long)
        at = 2 * batch + count * batch
        slots_t = packed[2 * batch : at].view(count, batch)
        offsets_t = packed[at : at + count * (batch + 1)].view(count, batch + 1)
        runs_t = packed[at + count * (batch + 1) :].view(-1, 2)
        query_scales = None
        if runner.config.applies_log_scale:
            query_scales = runner.log_scale(torch.tensor(lengths, dtype=torch.float32))
        views = pool.flat_layer_views
        return cpu_ops.llama_decode_run(
            packed[:batch],
            *self._model_arguments(),
            packed[batch : 2 * batch],
            runner.rotary_inv_freq(scales, torch.ones(batch, dtype=torch.long)),
            self.rope.attention_scaling,
            query_scales,
            slots_t,
            [k for k, _ in views],
            [v for _, v in views],
            runs_t,
            offsets_t,
            *((sampling.temperatures, sampling.uniforms, sampling.greedy_rows) if sampling is not None else ()),
        )

    def logits(self, steps: list[SequenceStep], scales: list[int], runner: ModelRunner) -> torch.Tensor:
        """[B, vocab] float32 next-token logits of ``steps`` (``fits``), with the runner's pool and rotary."""
        pool = runner.kv_cache
        block_size = runner.block_size
        count = len(steps)
        # ids, positions, slots, run offsets and runs, in one tensor (each torch.tensor call costs its own).
        ids, positions, slots, runs, offsets = [], [], [], [], [0]
        for step in steps:
            step.check_blocks(block_size)
            ids.append(step.token_ids[0])
            positions.append(step.num_cached)
            slots.append(pool.slot(step.block_table, step.num_cached))
            own = segments.sequence_runs(step.block_runs, step.block_table, step.total_len, block_size)
            runs.extend(itertools.chain.from_iterable(own))
            offsets.append(offsets[-1] + len(own))
        packed = torch.tensor(ids + positions + slots + offsets + runs, dtype=torch.long)
        ids_t, positions_t, slots_t = packed[:count], packed[count : 2 * count], packed[2 * count : 3 * count]
        offsets_t = packed[3 * count : 4 * count + 1]
        runs_t = packed[4 * count + 1 :].view(-1, 2)
        ones = torch.ones(count, dtype=torch.long)
        query_scale = runner.query_scale(steps, positions_t, ones)
        views = pool.flat_layer_views
        return cpu_ops.llama_decode_step(
            ids_t,
            *self._model_arguments(),
            positions_t,
            runner.rotary_inv_freq(scales, ones),
            self.rope.attention_scaling,
            query_scale.flatten() if query_scale is not None else None,
            slots_t,
            [k for k, _ in views],
            [v for _, v in views],
            runs_t,
            offsets_t,
        )
