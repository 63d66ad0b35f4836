"""Attention on the CPU that reads each sequence's cached K/V in place, one run of consecutive slots at a time.

It declares once what it needs of the cache (``cache_layout.RUNS``): sequences kept contiguous by the block
manager, so that a sequence is a handful of runs, and a head-major pool, where a run of slots is one
contiguous stretch per head, which the C++ decode attention reads about 1.7x faster than the same keys
strided across heads. It plans from the host block tables (no block-table tensor per step), once per step
for every layer (``RunPlan``). Measured faster than the padded gather of ``SdpaAttentionBackend`` at every
batch size and context tried (8-64 streams of 128-7,000 tokens); sliding windows stay with that backend.

With the C++ kernels (``kernels.cpu_ops``, chosen once when the backend is made), the rotary and cache write
is one call, every decode of a step is attended in one call per layer, and a prompt chunk whose context is
one run (a whole prompt, or a chunk after its cached prefix) in one flash-style call; without them the runs
are attended with PyTorch's CPU flash kernel, one call per run (``segments``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from clex_serve.attention import segments
from clex_serve.attention.backend import AttentionBackend
from clex_serve.attention.cache_layout import RUNS
from clex_serve.attention.metadata import AttentionMetadata, flat_slots
from clex_serve.attention.sdpa import rotate_and_write
from clex_serve.kernels import cpu_ops

# The key of this backend's plan in ``AttentionMetadata.backend_state``.
RUN_PLAN = "run_plan"


def decode_kernel_fits(head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """The C++ decode attention keeps a head's query and accumulators in registers: up to 256 dimensions and
    16 query heads per KV head (every supported checkpoint); other shapes attend run by run."""
    return head_dim <= cpu_ops.DECODE_MAX_HEAD_DIM and num_heads // num_kv_heads <= cpu_ops.DECODE_MAX_GROUP


# A chunk with fewer query rows per KV head (its tokens times the query heads sharing one) leaves most of
# the kernel's 64 lanes a task empty: 12 tokens over 6,000 cached keys (8 heads of 64) took 5.5 ms against
# 3.3 for PyTorch's masked call in float32, 32 tokens 5.4 against 5.3, 64 tokens 5.0 against 8.7.
PREFILL_KERNEL_MIN_ROWS = 32


def prefill_kernel_fits(dtype: torch.dtype, tokens: int, head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """The C++ prompt attention serves this chunk: head sizes up to 256 and 64 query heads per KV head, and
    ``PREFILL_KERNEL_MIN_ROWS`` query rows per KV head. Not bfloat16 where the CPU has AMX: PyTorch's flash
    kernel runs bfloat16 on the tiles there (674 GFLOP/s measured at 7,000 tokens), past what vector units
    reach."""
    if dtype == torch.bfloat16 and cpu_ops.amx_bf16_supported():
        return False
    group = num_heads // num_kv_heads
    return (
        head_dim <= cpu_ops.PREFILL_MAX_HEAD_DIM
        and group <= cpu_ops.PREFILL_MAX_GROUP
        and tokens * group >= PREFILL_KERNEL_MIN_ROWS
    )


def cpu_rotate_and_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sdpa.rotate_and_write`` in one C++ call (bit for bit the same)."""
    if meta.cos.dtype != q.dtype:
        return rotate_and_write(q, k, v, k_cache, v_cache, meta)
    scale = meta.query_scale.flatten() if meta.query_scale is not None else None
    return cpu_ops.rotate_and_cache(
        q, k, v, meta.cos, meta.sin, scale, meta.slot_mapping, flat_slots(k_cache), flat_slots(v_cache)
    )


def whole_prompt_in_one_run(
    q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor, run: tuple[int, int]
) -> torch.Tensor:
    """A whole prompt's queries q [L, Hq, D] over its own keys, the one run ``[start, end)`` of the pool, read in
    place -> [L, Hq, D]. PyTorch's fused CPU kernel with ``is_causal`` reads K/V once per query tile and skips
    the tiles above the diagonal: a 7,000-token prompt's attention per layer took 205 ms instead of 473 with an
    explicit mask in float32, 74 instead of 200 in bfloat16 (8 heads of 64, two threads). Grouped-query heads
    read their shared K/V head (``enable_gqa``), not a copy repeated per query head."""
    start, end = run
    keys = flat_k[start:end].unsqueeze(0).transpose(1, 2)  # a view: [1, Hkv, L, D]
    values = flat_v[start:end].unsqueeze(0).transpose(1, 2)
    queries = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
    grouped = q.shape[1] != flat_k.shape[1]
    out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=grouped)
    return out[0].transpose(0, 1)


def decode_row_groups(row_groups: list[int] | None, query_lens: list[int]) -> torch.Tensor | None:
    """``AttentionMetadata.row_groups`` (sizes over the step's sequences) as offsets over its decodes, the
    form ``cpu_ops.decode_attention`` takes; None when no group has more than one row."""
    if row_groups is None or all(size == 1 for size in row_groups):
        return None
    bounds, decodes, sequence = [0], 0, 0
    for size in row_groups:
        decodes += sum(1 for new in query_lens[sequence : sequence + size] if new == 1)
        if decodes != bounds[-1]:
            bounds.append(decodes)
        sequence += size
    return torch.tensor(bounds, dtype=torch.long)


@dataclass
class DecodeRuns:
    """Every decode of a step as one C++ decode attention call takes them."""

    runs: torch.Tensor  # [R, 2] int64 slot ranges [start, end)
    offsets: torch.Tensor  # [D + 1] int64: decode d's runs are rows offsets[d]..offsets[d + 1]
    rows: list[int]  # which sequences of the step decode
    # [G + 1] int64 offsets over the decodes: rows of one sequence attended together (None: each alone)
    row_groups: torch.Tensor | None = None


@dataclass
class RunPlan:
    """What every layer of a step reads, worked out once in ``prepare``."""

    # Per sequence, the slot runs it reads from the cache: a decode its whole context (its new key is
    # already there), a prompt chunk what was cached before it.
    runs: list[list[tuple[int, int]]]
    # Prompt chunks whose cached context and own slots are one run: that run, attended in one call.
    one_run: dict[int, tuple[int, int]]
    decodes: DecodeRuns | None  # with the C++ kernels, where the step has decodes
    # The end-aligned causal masks of PyTorch's fused call for chunks in one run after a cached prefix (rows
    # repeated per query head of a KV head), made when a layer first needs one (not for the C++ kernel).
    masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def every_sequence_decodes(self) -> bool:
        return self.decodes is not None and len(self.decodes.rows) == len(self.runs)


class CpuAttentionBackend(AttentionBackend):
    name = "cpu-sdpa"
    cache_layout = RUNS
    reads_block_tables = False  # plans from the host tables: no tensor that grows with the context

    def __init__(self, kernels: bool) -> None:
        """``kernels``: the C++ kernels serve the model's dtype here (``cpu_extension.cpu_kernels_for``)."""
        self.kernels = kernels
        self.rotate_and_write = cpu_rotate_and_write if kernels else rotate_and_write

    def prepare(self, meta: AttentionMetadata) -> None:
        kept = meta.block_runs_host or [None] * len(meta.query_lens)

        def slot_runs(index: int, length: int) -> list[tuple[int, int]]:
            return segments.sequence_runs(kept[index], meta.block_tables_host[index], length, meta.block_size)

        runs = [
            slot_runs(index, context if new == 1 else context - new)
            for index, (context, new) in enumerate(zip(meta.context_lens_host, meta.query_lens))
        ]
        # A prompt chunk whose cached context and own slots are one run: one call, causal from the end of the
        # run, instead of two calls and a merge.
        one_run = {}
        for index, (new, context) in enumerate(zip(meta.query_lens, meta.context_lens_host)):
            if new > 1:
                whole = slot_runs(index, context)
                if len(whole) == 1:
                    one_run[index] = whole[0]
        decodes = None
        rows = [index for index, new in enumerate(meta.query_lens) if new == 1]
        if self.kernels and rows:  # every decode of the step in one kernel call per layer: their runs as one tensor
            counts = [len(runs[index]) for index in rows]
            decodes = DecodeRuns(
                torch.tensor([run for index in rows for run in runs[index]], dtype=torch.long),
                torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.long),
                rows,
                decode_row_groups(meta.row_groups, meta.query_lens),
            )
        meta.backend_state[RUN_PLAN] = RunPlan(runs, one_run, decodes)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] (new tokens, not yet rotated) -> [N, Hq * D]."""
        q, k = self.rotate_and_write(q, k, v, k_cache, v_cache, meta)
        return self._attend(q, k, v, flat_slots(k_cache), flat_slots(v_cache), meta).reshape(q.shape[0], -1)

    def _attend(self, q, k, v, flat_k, flat_v, meta) -> torch.Tensor:
        plan: RunPlan = meta.backend_state[RUN_PLAN]
        starts = [0, *itertools.accumulate(meta.query_lens)]
        decodes = plan.decodes
        if decodes is not None and decode_kernel_fits(q.shape[-1], q.shape[1], flat_k.shape[1]):
            scale = q.shape[-1] ** -0.5
            groups = decodes.row_groups
            if plan.every_sequence_decodes():  # one call for the step
                return cpu_ops.decode_attention(q, flat_k, flat_v, decodes.runs, decodes.offsets, scale, groups)
            out = torch.empty_like(q)
            rows = torch.tensor([starts[index] for index in decodes.rows])
            out[rows] = cpu_ops.decode_attention(q[rows], flat_k, flat_v, decodes.runs, decodes.offsets, scale, groups)
            for index, query_len in enumerate(meta.query_lens):
                if query_len > 1:
                    start, end = starts[index], starts[index + 1]
                    out[start:end] = self._chunk(plan, index, q[start:end], k[start:end], v[start:end], flat_k, flat_v)
            return out
        outputs = []
        for index, query_len in enumerate(meta.query_lens):
            start, end = starts[index], starts[index + 1]
            if query_len == 1:
                outputs.append(segments.decode_one(q[start], flat_k, flat_v, plan.runs[index])[None])
            else:
                outputs.append(self._chunk(plan, index, q[start:end], k[start:end], v[start:end], flat_k, flat_v))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _chunk(self, plan: RunPlan, index, q, k, v, flat_k, flat_v) -> torch.Tensor:
        """Sequence ``index``'s prompt chunk over its cached runs and its own keys."""
        if index not in plan.one_run:
            return segments.prefill_one(q, k, v, flat_k, flat_v, plan.runs[index])
        start, end = plan.one_run[index]
        if self.kernels and prefill_kernel_fits(q.dtype, q.shape[0], q.shape[-1], q.shape[1], flat_k.shape[1]):
            return cpu_ops.prefill_attention(q, flat_k, flat_v, start, end - start, q.shape[-1] ** -0.5)
        if q.shape[0] == end - start:  # a whole prompt: causal from the start, as the fused kernel applies it
            return whole_prompt_in_one_run(q, flat_k, flat_v, (start, end))
        mask = plan.masks.get(index)
        if mask is None:  # once a step, for all layers
            group = q.shape[1] // flat_k.shape[1]
            mask = segments.causal_mask_at_end(q.shape[0], end - start, q.dtype).repeat(group, 1)
            plan.masks[index] = mask
        return segments.prefill_in_one_run(q, flat_k, flat_v, (start, end), mask)
