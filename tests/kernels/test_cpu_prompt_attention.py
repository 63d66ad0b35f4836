"""A whole prompt attends its own keys in place in the head-major pool, causally from its start, with
grouped-query heads reading their shared K/V head: what a plain causal softmax attention gives."""

import pytest
import torch

from clex_serve.attention.cpu import whole_prompt_in_one_run


def reference(q, k, v):
    """q [L, Hq, D], k/v [L, Hkv, D] -> causal attention in float64, [L, Hq, D]."""
    length, heads, dim = q.shape
    group = heads // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / dim**0.5
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_a_whole_prompt_in_the_pool_attends_causally(dtype, heads, kv_heads):
    torch.manual_seed(heads)
    length, dim, slots, start = 300, 64, 1024, 200
    pool_k = torch.randn(kv_heads, slots, dim, dtype=dtype)  # head-major: [Hkv, slots, D]
    pool_v = torch.randn(kv_heads, slots, dim, dtype=dtype)
    flat_k, flat_v = pool_k.transpose(0, 1), pool_v.transpose(0, 1)  # the [slots, Hkv, D] views readers take
    q = torch.randn(length, heads, dim, dtype=dtype)
    out = whole_prompt_in_one_run(q, flat_k, flat_v, (start, start + length))
    expected = reference(q, flat_k[start : start + length], flat_v[start : start + length])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
