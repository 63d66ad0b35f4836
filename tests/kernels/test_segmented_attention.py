"""CPU attention that reads the paged cache in place, run by run: the same result as SDPA over the
gathered context, for any split of the context into blocks, with grouped-query heads and in bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clex_serve.attention import segments
from clex_serve.attention.sdpa import context_slots

pytestmark = pytest.mark.skipif(
    not segments.segmented_attention_available(), reason="this PyTorch has no fused CPU attention with log-sum-exp"
)

BLOCK = 4


def test_contiguous_runs_merge_consecutive_blocks_and_stop_at_the_length():
    assert segments.contiguous_runs([3, 4, 5, 9, 10, 2], 22, BLOCK) == [(12, 24), (36, 44), (8, 10)]
    assert segments.contiguous_runs([7], 3, BLOCK) == [(28, 31)]
    assert segments.contiguous_runs([1, 2], 0, BLOCK) == []
    assert segments.contiguous_runs([5, 6, 7], 9, BLOCK) == [(20, 29)]


def cache_with(table: list[int], length: int, heads: int, dtype, seed: int):
    """A flat cache whose slots at ``table`` hold ``length`` random keys/values; the rest is noise."""
    generator = torch.Generator().manual_seed(seed)
    flat_k = torch.randn(64 * BLOCK, heads, 16, generator=generator).to(dtype)
    flat_v = torch.randn(64 * BLOCK, heads, 16, generator=generator).to(dtype)
    slots = context_slots(torch.tensor([table]), BLOCK, length)[0]
    return flat_k, flat_v, flat_k[slots], flat_v[slots]


TABLES = {
    "one run": [0, 1, 2, 3, 4, 5],
    "scattered": [9, 3, 4, 20, 21, 22],
    "every block apart": [11, 7, 30, 2, 40, 13],
}


@pytest.mark.parametrize("table", TABLES.values(), ids=TABLES.keys())
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_equals_sdpa_over_the_gathered_context(table, heads, kv_heads, dtype, tolerance):
    length = 22
    flat_k, flat_v, keys, values = cache_with(table, length, kv_heads, dtype, seed=1)
    q = torch.randn(heads, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    runs = segments.contiguous_runs(table, length, BLOCK)
    out = segments.decode_one(q, flat_k, flat_v, runs)
    expected = F.scaled_dot_product_attention(
        q[None, :, None].float(),
        keys.transpose(0, 1)[None].float(),
        values.transpose(0, 1)[None].float(),
        enable_gqa=True,
    )[0, :, 0]
    assert out.dtype == dtype and out.shape == (heads, 16)
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("table", TABLES.values(), ids=TABLES.keys())
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("cached", [0, 5, 12])
def test_prefill_chunk_sees_the_cache_and_its_own_keys_causally(table, heads, kv_heads, cached):
    new = 22 - cached
    flat_k, flat_v, keys, values = cache_with(table, 22, kv_heads, torch.float32, seed=3)
    q = torch.randn(new, heads, 16, generator=torch.Generator().manual_seed(4))
    runs = segments.contiguous_runs(table, cached, BLOCK)
    out = segments.prefill_one(q, keys[cached:], values[cached:], flat_k, flat_v, runs)
    positions = torch.arange(22)
    mask = positions[None, :] <= positions[cached:, None]  # query i (at cached + i) sees keys up to it
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys.transpose(0, 1)[None],
        values.transpose(0, 1)[None],
        attn_mask=mask,
        enable_gqa=True,
    )
    torch.testing.assert_close(out, expected[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_an_empty_query_or_context_is_a_no_op_not_a_crash():
    # The fused kernel divides by these lengths (a floating point exception kills the process).
    q = torch.zeros(1, 2, 0, 8)
    k = torch.zeros(1, 2, 5, 8)
    out, lse = segments.attend_with_lse(q, k, k)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)
    out, lse = segments.attend_with_lse(torch.zeros(1, 2, 3, 8), k[:, :, :0], k[:, :, :0])
    assert torch.isinf(lse).all() and out.abs().sum() == 0


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_chunk_in_one_run_with_its_cache_equals_the_merged_parts(heads, kv_heads, dtype, tolerance):
    """A prompt chunk whose cached context and own keys are one run of the pool: one call with the causal
    mask aligned to the end equals attending the cached run and the chunk apart and merging them."""
    generator = torch.Generator().manual_seed(5)
    cached, chunk, head_dim, start = 37, 9, 16, 20
    pool_k, pool_v = (torch.randn(100, kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    q = torch.randn(chunk, heads, head_dim, generator=generator).to(dtype)
    own = slice(start + cached, start + cached + chunk)  # the chunk's keys, written after its cached ones
    run = (start, start + cached + chunk)
    mask = segments.causal_mask_at_end(chunk, cached + chunk, dtype)
    mask = mask.repeat(heads // kv_heads, 1) if heads > kv_heads else mask
    one_call = segments.prefill_in_one_run(q, pool_k, pool_v, run, mask)
    merged = segments.prefill_one(q, pool_k[own], pool_v[own], pool_k, pool_v, [(start, start + cached)])
    torch.testing.assert_close(one_call.float(), merged.float(), atol=tolerance, rtol=tolerance)
