"""Rotate queries and keys, scale queries (CLEX log scale) and write K/V into the paged cache: one kernel.

Unfused this is rotate-half, two products and a sum for each of q and k, a product for the log scale and an
index copy for each of K and V: about thirteen launches per layer. Here each program handles one head of
one token: a query head is rotated, scaled and written to a fresh ``[tokens, heads, head_dim]`` tensor; a KV
head's key is rotated into the cache slot of its token and its value copied beside it. Channels past the
rotary dimension (Phi-2's partial rotary) pass through. ``cos``/``sin`` hold ``cat(angles, angles)`` in
the model dtype, as ``layers.rotary.apply_rotary`` receives them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    query_scale_ptr,
    slot_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_q,
    stride_k,
    stride_v,
    stride_cos,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
    HAS_QUERY_SCALE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = tl.arange(0, HALF_PAD)
    half_mask = half < ROTARY_DIM // 2
    cos = tl.load(cos_ptr + token * stride_cos + half, mask=half_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_cos + half, mask=half_mask, other=0.0).to(tl.float32)
    is_query = head < NUM_HEADS
    kv_head = tl.maximum(head - NUM_HEADS, 0)
    slot = tl.load(slot_ptr + token)
    if is_query:
        source = q_ptr + token * stride_q + head * HEAD_DIM
        target = q_out_ptr + (token * NUM_HEADS + head) * HEAD_DIM
    else:
        source = k_ptr + token * stride_k + kv_head * HEAD_DIM
        target = k_cache_ptr + (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
    dtype = q_out_ptr.dtype.element_ty
    x1 = tl.load(source + half, mask=half_mask, other=0.0).to(tl.float32)
    x2 = tl.load(source + ROTARY_DIM // 2 + half, mask=half_mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype as in PyTorch
    out1 = ((x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    if HAS_QUERY_SCALE:
        if is_query:
            scale = tl.load(query_scale_ptr + token).to(tl.float32)
            out1 = (out1.to(tl.float32) * scale).to(dtype)
            out2 = (out2.to(tl.float32) * scale).to(dtype)
    tl.store(target + half, out1, mask=half_mask)
    tl.store(target + ROTARY_DIM // 2 + half, out2, mask=half_mask)
    if ROTARY_DIM < HEAD_DIM:
        rest = tl.arange(0, PASS_PAD)
        rest_mask = rest < HEAD_DIM - ROTARY_DIM
        passed = tl.load(source + ROTARY_DIM + rest, mask=rest_mask, other=0.0)
        if HAS_QUERY_SCALE:
            if is_query:
                passed = (passed.to(tl.float32) * tl.load(query_scale_ptr + token).to(tl.float32)).to(dtype)
        tl.store(target + ROTARY_DIM + rest, passed.to(dtype), mask=rest_mask)
    if head >= NUM_HEADS:  # a KV head: its value goes beside its key
        dims = tl.arange(0, HALF_PAD * 2)
        dims_mask = dims < HEAD_DIM
        value = tl.load(v_ptr + token * stride_v + kv_head * HEAD_DIM + dims, mask=dims_mask, other=0.0)
        tl.store(v_cache_ptr + (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM + dims, value, mask=dims_mask)


def rotate_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_scale: torch.Tensor | None,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] (views with contiguous heads), cos/sin [N, rotary_dim], query_scale
    [N, 1, 1] or None, slot_mapping [N]; k_cache/v_cache [blocks, block_size, Hkv, D] contiguous.
    Returns the rotated, scaled queries [N, Hq, D]; the rotated keys and the values go into the cache."""
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rotary_dim = cos.shape[-1]
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.stride(2) != 1 or tensor.stride(1) != head_dim:
            raise ValueError(f"rotate_and_cache needs {name} with contiguous heads")
    if not (
        k_cache.is_contiguous() and v_cache.is_contiguous() and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    ):
        raise ValueError("rotate_and_cache needs contiguous caches and rotary tables")
    q_out = torch.empty(tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    half_pad = triton.next_power_of_2(max(head_dim, rotary_dim) // 2)
    _rotary_cache_kernel[(tokens, num_heads + num_kv_heads)](
        q,
        k,
        v,
        cos,
        sin,
        query_scale if query_scale is not None else cos,
        slot_mapping,
        q_out,
        k_cache,
        v_cache,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        cos.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        ROTARY_DIM=rotary_dim,
        HALF_PAD=half_pad,
        PASS_PAD=triton.next_power_of_2(max(1, head_dim - rotary_dim)),
        HAS_QUERY_SCALE=query_scale is not None,
        num_warps=1,
    )
    return q_out
