"""A plain float64 attention over a paged cache, the reference for the decode kernels."""

import torch


def reference_attention(q, k_cache, v_cache, tables, lengths, window):
    """Float64 attention of each sequence's one query over its cache, gathered through its block table."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    outputs = []
    for index, length in enumerate(lengths):
        positions = torch.arange(length, device=q.device)
        slots = tables[index].long()[positions // block_size] * block_size + positions % block_size
        keys = k_cache.reshape(-1, num_kv_heads, head_dim)[slots].double().repeat_interleave(group, 1)
        values = v_cache.reshape(-1, num_kv_heads, head_dim)[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", q[index].double(), keys) / head_dim**0.5
        if window is not None:
            scores[:, : max(0, length - window)] = float("-inf")
        outputs.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values))
    return torch.stack(outputs)
