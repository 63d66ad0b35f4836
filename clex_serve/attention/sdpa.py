"""Attention over the paged KV cache with ``torch.nn.functional.scaled_dot_product_attention``, on any device.

Decode steps batch every sequence into one padded SDPA call whose key gather and mask are prepared once per
step; prefill runs one SDPA call per sequence over its gathered context, causal without a mask when the
whole context is new. It serves sliding windows, CUDA without flash-attn or Triton, and the prefill of the
Triton backend; on the CPU without a sliding window ``attention.cpu`` reads the cache in place instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from clex_serve.attention.backend import AttentionBackend
from clex_serve.attention.metadata import AttentionMetadata, cache_slot, flat_slots
from clex_serve.layers.rotary import apply_rotary

# Rotates q and k with the step's tables, writes k and v to their cache slots, returns the rotated q and k.
RotateAndWrite = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def rotate_queries_and_keys(
    q: torch.Tensor, k: torch.Tensor, meta: AttentionMetadata
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k with the step's tables; multiply queries by the CLEX log scale where it applies."""
    q = apply_rotary(q, meta.cos, meta.sin)
    k = apply_rotary(k, meta.cos, meta.sin)
    if meta.query_scale is not None:
        q = q * meta.query_scale
    return q, k


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    flat_slots(k_cache).index_copy_(0, slot_mapping, k)
    flat_slots(v_cache).index_copy_(0, slot_mapping, v)


def rotate_and_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager ``RotateAndWrite``: rotate (and scale) with PyTorch's operators, then write K/V."""
    q, k = rotate_queries_and_keys(q, k, meta)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    return q, k


def gather_slots(flat_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a [slots, heads, head_dim] cache at ``slots`` (any shape): ``index_select`` copies whole rows,
    about twice as fast on the CPU as advanced indexing."""
    return flat_cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *flat_cache.shape[1:])


def context_slots(block_tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Flat cache slots of positions ``0..length-1`` for each row of ``block_tables`` [B, max_blocks]."""
    positions = torch.arange(length, device=block_tables.device).expand(block_tables.shape[0], length)
    return cache_slot(block_tables.long(), positions, block_size)


def visibility_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """True where a query may attend a key: causal and, with a window, ``q - k < window`` (transformers')."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]
    mask = distance >= 0
    if sliding_window is not None:
        mask &= distance < sliding_window
    return mask


class PaddedDecode(NamedTuple):
    """A decode step's key gather, prepared once for every layer."""

    slots: torch.Tensor  # [B, max_context] cache slots of each sequence's positions (padded)
    mask: torch.Tensor  # [B, 1, 1, max_context] True where a query sees the key


class SdpaAttentionBackend(AttentionBackend):
    name = "sdpa"
    # Its decode sizes the key gather by the longest context of the step, a host value: not capturable.
    supports_cuda_graphs = False

    def __init__(self, sliding_window: int | None, rotate_and_write: RotateAndWrite = rotate_and_write) -> None:
        """``rotate_and_write``: the eager one, or a fused kernel's for the device (chosen by the selector)."""
        self.sliding_window = sliding_window
        self.rotate_and_write = rotate_and_write

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers: the decode gather indices and mask."""
        if not meta.is_decode:
            return
        max_len = max(meta.context_lens_host)
        slots = context_slots(meta.block_tables, meta.block_size, max_len)
        key_positions = torch.arange(max_len, device=slots.device)
        mask = key_positions[None, :] < meta.context_lens[:, None]
        if self.sliding_window is not None:
            mask &= (meta.positions[:, None] - key_positions[None, :]) < self.sliding_window
        meta.backend_state["padded_decode"] = PaddedDecode(slots, mask[:, None, None, :])

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
        if meta.is_decode:
            out = self._decode(q, k_cache, v_cache, meta)
        else:
            out = self._prefill(q, k, v, k_cache, v_cache, meta)
        return out.reshape(q.shape[0], -1)

    def _decode(self, q, k_cache, v_cache, meta) -> torch.Tensor:
        num_kv_heads = flat_slots(k_cache).shape[1]
        gather = meta.backend_state["padded_decode"]
        keys = gather_slots(flat_slots(k_cache), gather.slots).transpose(1, 2)  # [B, Hkv, S, D]
        values = gather_slots(flat_slots(v_cache), gather.slots).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],
            keys,
            values,
            attn_mask=gather.mask,
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
                slots = context_slots(meta.block_tables[index : index + 1], meta.block_size, context_len)[0]
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
