"""Attention over the paged KV cache with ``torch.nn.functional.scaled_dot_product_attention``.

Runs on CPU and GPU. On the CPU, attention reads cached K/V in place, one contiguous run of blocks at a
time (``segments``), so its cost is the context actually cached. Elsewhere, and with a sliding window,
decode steps batch every sequence into one padded SDPA call whose key gather and mask are prepared once per
step, and prefill runs one SDPA call per sequence over its gathered context, causal without a mask when the
whole context is new.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from clex_serve.attention import segments
from clex_serve.attention.metadata import AttentionMetadata, cache_slot, flat_slots
from clex_serve.kernels import use_cpu_kernels
from clex_serve.layers.rotary import apply_rotary


def rotate_queries_and_keys(q: torch.Tensor, k: torch.Tensor,
                            meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k with the step's tables; multiply queries by the CLEX log scale where it applies."""
    q = apply_rotary(q, meta.cos, meta.sin)
    k = apply_rotary(k, meta.cos, meta.sin)
    if meta.query_scale is not None:
        q = q * meta.query_scale
    return q, k


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    flat_slots(k_cache).index_copy_(0, slot_mapping, k)
    flat_slots(v_cache).index_copy_(0, slot_mapping, v)


def gather_slots(flat_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a [slots, heads, head_dim] cache at ``slots`` (any shape): ``index_select`` copies whole rows,
    about twice as fast on the CPU as advanced indexing."""
    return flat_cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *flat_cache.shape[1:])


def context_slots(block_tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Flat cache slots of positions ``0..length-1`` for each row of ``block_tables`` [B, max_blocks]."""
    positions = torch.arange(length, device=block_tables.device).expand(block_tables.shape[0], length)
    return cache_slot(block_tables.long(), positions, block_size)


def visibility_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                    sliding_window: int | None) -> torch.Tensor:
    """True where a query may attend a key: causal and, with a window, ``q - k < window`` (transformers')."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]
    mask = distance >= 0
    if sliding_window is not None:
        mask &= distance < sliding_window
    return mask


def decode_kernel_fits(q: torch.Tensor, flat_k: torch.Tensor) -> bool:
    """The C++ decode attention keeps a head's query and accumulators in registers: up to 256 dimensions and
    16 query heads per KV head (every supported checkpoint); other shapes attend run by run."""
    return q.shape[-1] <= 256 and q.shape[1] // flat_k.shape[1] <= 16


class SdpaAttentionBackend:
    name = "sdpa"
    # Its decode sizes the key gather by the longest context of the step, a host value: not capturable.
    supports_cuda_graphs = False

    def __init__(self, sliding_window: int | None) -> None:
        self.sliding_window = sliding_window

    def reads_cache_in_runs(self, device: torch.device) -> bool:
        """On the CPU without a sliding window: attention reads each sequence's cached runs in place
        (measured faster than the padded gather at every batch size and context tried, 8-64 streams of
        128-7,000 tokens), and wants the pool head-major and sequences kept contiguous."""
        return (device.type == "cpu" and self.sliding_window is None
                and segments.segmented_attention_available())

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers: each sequence's runs of cached slots, or the decode gather
        indices and mask."""
        if meta.block_tables_host is not None and self.reads_cache_in_runs(meta.positions.device):
            # A sequence with one new token (a decode, also in a mixed step) reads its whole context from the
            # cache, where its new key already is; a prompt chunk reads what was cached before it.
            kept = meta.block_runs_host or [None] * len(meta.query_lens)

            def slot_runs(index: int, length: int) -> list[tuple[int, int]]:
                """Sequence ``index``'s first ``length`` slots as runs: from the runs the block manager
                keeps, else by scanning its table."""
                if kept[index] is not None:
                    return segments.slot_runs(kept[index], length, meta.block_size)
                return segments.contiguous_runs(meta.block_tables_host[index], length, meta.block_size)

            runs = [slot_runs(index, context if new == 1 else context - new)
                    for index, (context, new) in enumerate(zip(meta.context_lens_host, meta.query_lens))]
            meta.backend_state["runs"] = runs
            # A prompt chunk whose cached context and own slots are one run: one fused call with an
            # end-aligned causal mask (built here once for all layers) instead of two calls and a merge.
            one_run = {}
            for index, (new, context) in enumerate(zip(meta.query_lens, meta.context_lens_host)):
                if new > 1:
                    whole = slot_runs(index, context)
                    if len(whole) == 1:
                        one_run[index] = (whole[0], segments.causal_mask_at_end(new, context, meta.cos.dtype))
            meta.backend_state["one_run"] = one_run
            if use_cpu_kernels(meta.cos):
                # Every decode of the step in one kernel call per layer: their runs as one tensor.
                decodes = [index for index, new in enumerate(meta.query_lens) if new == 1]
                if decodes:
                    counts = [len(runs[index]) for index in decodes]
                    meta.backend_state["decode_runs"] = (
                        torch.tensor([run for index in decodes for run in runs[index]], dtype=torch.long),
                        torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.long),
                        decodes,
                    )
            return
        if not meta.is_decode:
            return
        max_len = max(meta.context_lens_host)
        slots = context_slots(meta.block_tables, meta.block_size, max_len)
        key_positions = torch.arange(max_len, device=slots.device)
        mask = key_positions[None, :] < meta.context_lens[:, None]
        if self.sliding_window is not None:
            mask &= (meta.positions[:, None] - key_positions[None, :]) < self.sliding_window
        meta.backend_state["slots"] = slots
        meta.backend_state["mask"] = mask[:, None, None, :]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] (new tokens, not yet rotated) -> [N, Hq * D]."""
        if use_cpu_kernels(q) and meta.cos.dtype == q.dtype:
            scale = meta.query_scale.flatten() if meta.query_scale is not None else None
            q, k = torch.ops.clex_cpu.rotate_and_cache(q, k, v, meta.cos, meta.sin, scale, meta.slot_mapping,
                                                       flat_slots(k_cache), flat_slots(v_cache))
        else:
            q, k = rotate_queries_and_keys(q, k, meta)
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if "runs" in meta.backend_state:
            out = self._segmented(q, k, v, k_cache, v_cache, meta)
        elif meta.is_decode:
            out = self._decode(q, k_cache, v_cache, meta)
        else:
            out = self._prefill(q, k, v, k_cache, v_cache, meta)
        return out.reshape(q.shape[0], -1)

    def _segmented(self, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        flat_k, flat_v = flat_slots(k_cache), flat_slots(v_cache)
        runs = meta.backend_state["runs"]
        starts = [0, *itertools.accumulate(meta.query_lens)]
        decode_runs = meta.backend_state.get("decode_runs")
        if decode_runs is not None and decode_kernel_fits(q, flat_k):  # every decode of the step at once
            run_tensor, offsets, decodes = decode_runs
            if len(decodes) == len(meta.query_lens):
                return torch.ops.clex_cpu.decode_attention(q, flat_k, flat_v, run_tensor, offsets, q.shape[-1] ** -0.5)
            out = torch.empty_like(q)
            rows = torch.tensor([starts[index] for index in decodes])
            out[rows] = torch.ops.clex_cpu.decode_attention(q[rows], flat_k, flat_v, run_tensor, offsets,
                                                            q.shape[-1] ** -0.5)
            for index, query_len in enumerate(meta.query_lens):
                if query_len > 1:
                    start, end = starts[index], starts[index + 1]
                    out[start:end] = self._chunk(index, q[start:end], k[start:end], v[start:end], flat_k, flat_v, meta)
            return out
        outputs = []
        for index, query_len in enumerate(meta.query_lens):
            start, end = starts[index], starts[index + 1]
            if query_len == 1:
                outputs.append(segments.decode_one(q[start], flat_k, flat_v, runs[index])[None])
            else:
                outputs.append(self._chunk(index, q[start:end], k[start:end], v[start:end], flat_k, flat_v, meta))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def _chunk(index, q, k, v, flat_k, flat_v, meta) -> torch.Tensor:
        """Sequence ``index``'s prompt chunk over its cached runs and its own keys."""
        one_runs = meta.backend_state.get("one_run", {})
        if index in one_runs:
            run, mask = one_runs[index]
            group = q.shape[1] // flat_k.shape[1]
            if mask.shape[0] != group * q.shape[0]:  # grouped-query heads: rows per query head, once a step
                mask = mask.repeat(group, 1)
                one_runs[index] = (run, mask)
            return segments.prefill_in_one_run(q, flat_k, flat_v, run, mask)
        return segments.prefill_one(q, k, v, flat_k, flat_v, meta.backend_state["runs"][index])

    def _decode(self, q, k_cache, v_cache, meta) -> torch.Tensor:
        num_kv_heads = flat_slots(k_cache).shape[1]
        slots = meta.backend_state["slots"]
        keys = gather_slots(flat_slots(k_cache), slots).transpose(1, 2)  # [B, Hkv, S, D]
        values = gather_slots(flat_slots(v_cache), slots).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=meta.backend_state["mask"],
            enable_gqa=q.shape[1] != num_kv_heads,
        )
        return out[:, :, 0, :]

    def _prefill(self, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        flat_k, flat_v = flat_slots(k_cache), flat_slots(v_cache)
        num_kv_heads = flat_k.shape[1]
        gqa = q.shape[1] != num_kv_heads
        outputs = []
        start = 0
        for index, (query_len, context_len) in enumerate(zip(meta.query_lens, meta.context_lens_host)):
            end = start + query_len
            q_seq = q[start:end].transpose(0, 1)[None]
            if context_len == query_len:
                # The whole context is new: attend to the step's own keys, no cache gather.
                k_seq, v_seq = k[start:end], v[start:end]
            else:
                slots = context_slots(meta.block_tables[index:index + 1], meta.block_size, context_len)[0]
                k_seq, v_seq = gather_slots(flat_k, slots), gather_slots(flat_v, slots)
            k_seq, v_seq = k_seq.transpose(0, 1)[None], v_seq.transpose(0, 1)[None]
            if context_len == query_len and self.sliding_window is None:
                out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, is_causal=True, enable_gqa=gqa)
            else:
                key_positions = torch.arange(context_len, device=q.device)
                mask = visibility_mask(meta.positions[start:end], key_positions, self.sliding_window)
                out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=mask, enable_gqa=gqa)
            outputs.append(out[0].transpose(0, 1))
            start = end
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
