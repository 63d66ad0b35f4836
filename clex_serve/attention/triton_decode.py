"""Paged decode attention in Triton: one new query token per sequence against its cached blocks.

Flash-decoding: each program takes one sequence, one KV head (with every query head that shares it under
GQA) and one split of the context, and writes a partial output with its log-sum-exp; a second kernel merges
the splits. Splitting the context is what keeps every multiprocessor busy at batch 1, where attention over
a long context is read by only ``kv_heads`` programs otherwise.

Block tables and context lengths are read on the device and the split count depends only on the batch
size, so a launch needs no per-step host value: the kernels are captured once per batch size in a CUDA graph.
Keys are read through the block table one token row (``head_dim`` contiguous elements) at a time, so any
block size works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per loop iteration of a program. 64 rows of K and V (16 KiB each in bf16 at head_dim 128) keep
# enough bytes in flight per program while short contexts still waste little.
TILE = 64
MAX_SPLITS = 32
_NO_WINDOW = 1 << 30


@triton.jit
def _split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    sm_scale,
    sliding_window,
    stride_q_seq,
    stride_q_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table_seq,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    QUERY_ROWS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    TILE_N: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    # The query (position context_len - 1) sees the last `sliding_window` keys; no window is passed as 2**30.
    first = tl.maximum(context_len - sliding_window, 0)
    per_split = tl.cdiv(tl.cdiv(context_len - first, NUM_SPLITS), TILE_N) * TILE_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, context_len)

    rows = tl.arange(0, QUERY_ROWS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_valid = rows < QUERIES_PER_KV
    dim_valid = dims < HEAD_DIM
    heads = kv_head * QUERIES_PER_KV + rows
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )

    running_max = tl.full([QUERY_ROWS], float("-inf"), tl.float32)
    running_sum = tl.zeros([QUERY_ROWS], tl.float32)
    acc = tl.zeros([QUERY_ROWS, HEAD_DIM_PAD], tl.float32)
    offsets = tl.arange(0, TILE_N)
    table = block_tables_ptr + seq * stride_table_seq
    for tile_start in range(start, end, TILE_N):
        positions = tile_start + offsets
        valid = positions < end
        blocks = tl.load(table + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows_at = (
            blocks * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head
        )
        kv_mask = valid[:, None] & dim_valid[None, :]
        keys = tl.load(k_cache_ptr + rows_at[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if IEEE_DOT:
            scores = tl.dot(q, tl.trans(keys), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(keys))
        scores = tl.where(valid[None, :], scores * sm_scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, 1)
        values = tl.load(v_cache_ptr + rows_at[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if IEEE_DOT:
            acc = acc * correction[:, None] + tl.dot(probs.to(values.dtype), values, input_precision="ieee")
        else:
            acc = acc * correction[:, None] + tl.dot(probs.to(values.dtype), values)
        running_max = new_max

    nonempty = running_sum > 0  # a split past the end of a short context saw no key
    out = acc / tl.where(nonempty, running_sum, 1.0)[:, None]
    lse = tl.where(nonempty, running_max + tl.log(tl.where(nonempty, running_sum, 1.0)), float("-inf"))
    # partial_out [B, Hq, NUM_SPLITS, HEAD_DIM_PAD], partial_lse [B, Hq, NUM_SPLITS], both contiguous
    head_rows = (seq * (tl.num_programs(1) * QUERIES_PER_KV) + heads) * NUM_SPLITS + split
    tl.store(partial_out_ptr + head_rows[:, None] * HEAD_DIM_PAD + dims[None, :], out, mask=row_valid[:, None])
    tl.store(partial_lse_ptr + head_rows, lse, mask=row_valid)


@triton.jit
def _merge_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    stride_out_seq,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    lse = tl.load(partial_lse_ptr + row * NUM_SPLITS + splits)
    weights = tl.exp(lse - tl.max(lse, 0))  # empty splits have lse -inf: weight 0
    partial = tl.load(partial_out_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM_PAD + dims[None, :])
    out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def num_splits_for(batch_size: int, num_kv_heads: int, num_multiprocessors: int) -> int:
    """Context splits per (sequence, KV head): enough programs for about two per multiprocessor. (On an
    H200 at 16K tokens, batch 1, 32 KV heads: 16 splits 81 us per layer, 32 splits 85, 8 splits 94.)"""
    programs = batch_size * num_kv_heads
    wanted = -(-2 * num_multiprocessors // programs)
    return min(MAX_SPLITS, triton.next_power_of_2(wanted))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_splits: int,
    sliding_window: int | None = None,
    scale: float | None = None,
    tile: int = TILE,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of one query per sequence over its cache.

    q [B, Hq, D]; k_cache/v_cache [blocks, block_size, Hkv, D] (one layer's view of the pool);
    block_tables [B, max_blocks] and context_lens [B] (integers, on q's device; context_lens counts the new
    token, whose K/V must already be in the cache). Returns [B, Hq, D] in q's dtype. ``tile``, ``num_warps``
    and ``num_stages`` are launch parameters, exposed for the GPU benchmark's sweep.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads}x{head_dim} do not fit cache heads {num_kv_heads}x{cache_head_dim}")
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("paged decode needs the head dimension contiguous and K/V views of one layout")
    queries_per_kv = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    partial_out = torch.empty(batch, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        partial_out,
        partial_lse,
        scale if scale is not None else head_dim**-0.5,
        sliding_window or _NO_WINDOW,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        QUERIES_PER_KV=queries_per_kv,
        QUERY_ROWS=max(16, triton.next_power_of_2(queries_per_kv)),
        NUM_SPLITS=num_splits,
        TILE_N=tile,
        IEEE_DOT=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _merge_kernel[(batch, num_heads)](
        partial_out,
        partial_lse,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        NUM_SPLITS=num_splits,
    )
    return out
