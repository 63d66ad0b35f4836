"""Attention that reads a sequence's cached K/V in place: one SDPA call per contiguous run of its blocks.

A paged cache scatters a sequence over blocks, and gathering them into a new tensor before attending reads
and writes every cached key and value once more than attention needs (three passes over the largest data of
a long-context step instead of one). But blocks that follow each other in the pool are one strided view of
it, and the block manager hands out consecutive blocks where it can, so a sequence is usually a handful of
runs. Each run is attended with PyTorch's CPU flash kernel, which also returns the log-sum-exp of its
scores; the runs' outputs are merged with those (the flash-decoding merge), exactly as one softmax over the
whole context would weigh them.
"""

from __future__ import annotations

import torch

# PyTorch's fused CPU attention, which (unlike F.scaled_dot_product_attention) returns the log-sum-exp.
_flash_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def segmented_attention_available() -> bool:
    return _flash_with_lse is not None


def contiguous_runs(block_table: list[int], num_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Flat slot ranges ``[start, end)`` covering positions ``0..num_tokens-1``: consecutive blocks merged."""
    runs: list[tuple[int, int]] = []
    for index in range(-(-num_tokens // block_size)):
        block = block_table[index]
        length = min(block_size, num_tokens - index * block_size)
        start = block * block_size
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + length)
        else:
            runs.append((start, start + length))
    return runs


def slot_runs(runs: list[list[int]], num_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """What ``contiguous_runs`` gives for the table of these ``[first_block, count]`` block runs, in O(runs):
    the block manager keeps each table's runs as it grows, so a step costs the same at any context length."""
    slots: list[tuple[int, int]] = []
    left = num_tokens
    for first, count in runs:
        if left <= 0:
            break
        length = min(count * block_size, left)
        slots.append((first * block_size, first * block_size + length))
        left -= length
    return slots


def sequence_runs(
    block_runs: list[list[int]] | None, block_table: list[int], num_tokens: int, block_size: int
) -> list[tuple[int, int]]:
    """A sequence's first ``num_tokens`` slots as runs: from the block runs the block manager keeps, else by
    scanning its table."""
    if block_runs is not None:
        return slot_runs(block_runs, num_tokens, block_size)
    return contiguous_runs(block_table, num_tokens, block_size)


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, H, Lq, D], k/v [1, H, Lk, D] (any strides with a unit last one) -> (out, lse [1, H, Lq] f32)."""
    if q.shape[2] == 0 or k.shape[2] == 0:  # the kernel divides by these lengths
        out = q.new_zeros(*q.shape[:3], v.shape[3])
        return out, torch.full(q.shape[:3], float("-inf"), dtype=torch.float32)
    return _flash_with_lse(q, k, v, is_causal=is_causal)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One attention output from the outputs and log-sum-exps of disjoint key sets (in float32)."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])  # [P, 1, H, Lq]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total)[..., None]  # [P, 1, H, Lq, 1]
    out = sum(weight * part.float() for weight, (part, _) in zip(weights, parts))
    return out.to(parts[0][0].dtype)


def cached_parts(
    q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor, runs: list[tuple[int, int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Attention of q [1, Hkv, Lq, D] over each run of the flat [slots, Hkv, D] cache, without a mask."""
    parts = []
    for start, end in runs:
        keys = flat_k[start:end].unsqueeze(0).transpose(1, 2)  # a view: [1, Hkv, n, D]
        values = flat_v[start:end].unsqueeze(0).transpose(1, 2)
        parts.append(attend_with_lse(q, keys, values))
    return parts


def decode_one(
    q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor, runs: list[tuple[int, int]]
) -> torch.Tensor:
    """One decode query q [Hq, D] over its cached context (its own key included) -> [Hq, D].

    Query heads sharing a KV head ride as that head's query rows, so grouped-query attention reads each
    K/V head once (no repeat)."""
    num_heads, head_dim = q.shape
    num_kv_heads = flat_k.shape[1]
    grouped = q.view(1, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = merge(cached_parts(grouped, flat_k, flat_v, runs))
    return out.reshape(num_heads, head_dim)


def prefill_one(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    flat_k: torch.Tensor,
    flat_v: torch.Tensor,
    cached_runs: list[tuple[int, int]],
) -> torch.Tensor:
    """A chunk's queries q [Lq, Hq, D] over the cached runs (all visible) and its own keys k_new/v_new
    [Lq, Hkv, D] (causal) -> [Lq, Hq, D]."""
    num_heads = q.shape[1]
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    queries = q.transpose(0, 1)[None]  # [1, Hq, Lq, D]
    keys, values = k_new.transpose(0, 1)[None], v_new.transpose(0, 1)[None]
    if group > 1:
        # The flash kernel wants as many K/V heads as query heads; a chunk's own keys are few, the cached
        # ones are read per KV head below.
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    parts = [attend_with_lse(queries, keys, values, is_causal=True)]
    if cached_runs:
        length = q.shape[0]
        # [1, Hkv, group * Lq, D]: each KV head's query heads one after the other.
        grouped = queries.reshape(1, num_kv_heads, group * length, q.shape[2])
        for out, lse in cached_parts(grouped, flat_k, flat_v, cached_runs):
            parts.append((out.reshape(1, num_heads, length, -1), lse.reshape(1, num_heads, length)))
    return merge(parts)[0].transpose(0, 1)


def causal_mask_at_end(num_queries: int, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [Lq, Lk]: the queries are the last Lq positions of the keys, each seeing the keys up to
    its own (a causal mask aligned to the end; SDPA's ``is_causal`` aligns to the start). With grouped-query
    heads ``prefill_in_one_run`` wants its rows repeated once per query head of a KV head."""
    own = torch.arange(num_keys - num_queries, num_keys)[:, None]
    mask = torch.zeros(num_queries, num_keys, dtype=dtype)
    return mask.masked_fill_(torch.arange(num_keys)[None, :] > own, float("-inf"))


def prefill_in_one_run(
    q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor, run: tuple[int, int], mask: torch.Tensor
) -> torch.Tensor:
    """A chunk's queries q [Lq, Hq, D] whose whole context, its own keys included (already written), is the
    one run ``[start, end)`` of the pool: one fused call with ``causal_mask_at_end``, instead of attending
    the cached part and the chunk apart and merging them. -> [Lq, Hq, D]."""
    length, num_heads, head_dim = q.shape
    num_kv_heads = flat_k.shape[1]
    start, end = run
    keys = flat_k[start:end].unsqueeze(0).transpose(1, 2)  # a view: [1, Hkv, n, D]
    values = flat_v[start:end].unsqueeze(0).transpose(1, 2)
    # [1, Hkv, group * Lq, D]: each KV head's query heads one after the other, as the mask's rows repeat.
    grouped = q.transpose(0, 1).reshape(1, num_kv_heads, (num_heads // num_kv_heads) * length, head_dim)
    out, _ = _flash_with_lse(grouped, keys, values, attn_mask=mask[None, None])
    return out.reshape(num_heads, length, head_dim).transpose(0, 1)
