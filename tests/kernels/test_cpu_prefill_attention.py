"""The C++ prompt attention (csrc/prefill_attention.cpp) is causal attention aligned to the end of its run: a
whole prompt, and a chunk after its cached prefix, in place in the head-major pool, with grouped-query heads
reading their shared KV head, against a float64 softmax attention; through the CPU backend it agrees with
PyTorch's fused kernel that it replaces."""

import pytest
import torch

from clex_serve.attention.cpu import whole_prompt_in_one_run
from clex_serve.attention.segments import causal_mask_at_end, prefill_in_one_run
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available

pytestmark = [
    pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here"),
    pytest.mark.usefixtures("each_cpu_isa"),
]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference(q, k, v):
    """q [L, Hq, D], k/v [C, Hkv, D]: query i sees keys up to C - L + i, in float64 -> [L, Hq, D]."""
    length, heads, dim = q.shape
    context = k.shape[0]
    group = heads // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / dim**0.5
    hidden = torch.arange(context)[None, :] > torch.arange(context - length, context)[:, None]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)


def pool(kv_heads, slots, dim, dtype):
    """Head-major K and V pools as the [slots, Hkv, D] views readers take."""
    return (torch.randn(kv_heads, slots, dim, dtype=dtype).transpose(0, 1) for _ in range(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("length", "context", "heads", "kv_heads", "dim"),
    [
        (1, 1, 1, 1, 64),  # one token
        (300, 300, 8, 2, 64),  # a whole prompt, 4 query heads a KV head, not a whole number of tiles
        (64, 64, 4, 4, 128),  # exactly one tile of rows and keys
        (130, 700, 8, 8, 80),  # a chunk after a cached prefix that is not a whole number of tiles (Phi-2's head)
        (50, 200, 6, 2, 36),  # 3 query heads a KV head (64 rows are not whole positions), head size not a 16
        (20, 90, 32, 2, 256),  # 16 query heads a KV head, the largest head size
        (5, 5, 64, 1, 16),  # 64 query heads on one KV head: one position a task
        (40, 100, 4, 2, 33),  # an odd head size: bfloat16 widened to float32 (no pairs) on every CPU
    ],
)
def test_prompt_attention_is_causal_from_the_end_of_its_run(dtype, length, context, heads, kv_heads, dim):
    torch.manual_seed(length + context + dim)
    start = 37
    flat_k, flat_v = pool(kv_heads, start + context + 29, dim, dtype)
    q = torch.randn(length, heads, dim, dtype=dtype)
    out = cpu_ops.prefill_attention(q, flat_k, flat_v, start, context, dim**-0.5)
    expected = reference(q, flat_k[start : start + context], flat_v[start : start + context])
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queries_are_read_through_their_strides(dtype):
    # The engine's queries are a view of the fused qkv projection's output, not a contiguous tensor.
    torch.manual_seed(1)
    length, heads, kv_heads, dim = 100, 4, 2, 64
    flat_k, flat_v = pool(kv_heads, 256, dim, dtype)
    qkv = torch.randn(length, (heads + 2 * kv_heads) * dim, dtype=dtype)
    q = qkv[:, : heads * dim].view(length, heads, dim)
    out = cpu_ops.prefill_attention(q, flat_k, flat_v, 10, length, dim**-0.5)
    torch.testing.assert_close(out, cpu_ops.prefill_attention(q.contiguous(), flat_k, flat_v, 10, length, dim**-0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_it_agrees_with_the_fused_kernel_it_replaces(dtype):
    torch.manual_seed(2)
    heads, kv_heads, dim, start = 8, 2, 64, 64
    flat_k, flat_v = pool(kv_heads, 2048, dim, dtype)
    whole = torch.randn(900, heads, dim, dtype=dtype)  # a whole prompt: causal from the start
    torch.testing.assert_close(
        cpu_ops.prefill_attention(whole, flat_k, flat_v, start, 900, dim**-0.5),
        whole_prompt_in_one_run(whole, flat_k, flat_v, (start, start + 900)),
        atol=TOLERANCE[dtype],
        rtol=TOLERANCE[dtype],
    )
    chunk = torch.randn(200, heads, dim, dtype=dtype)  # the last 200 of 1,000 keys
    mask = causal_mask_at_end(200, 1000, dtype).repeat(heads // kv_heads, 1)
    torch.testing.assert_close(
        cpu_ops.prefill_attention(chunk, flat_k, flat_v, start, 1000, dim**-0.5),
        prefill_in_one_run(chunk, flat_k, flat_v, (start, start + 1000), mask),
        atol=TOLERANCE[dtype],
        rtol=TOLERANCE[dtype],
    )


def test_bad_shapes_are_refused():
    flat_k, flat_v = pool(2, 100, 64, torch.float32)
    q = torch.randn(10, 4, 64)
    with pytest.raises(RuntimeError, match="must hold the chunk's keys"):
        cpu_ops.prefill_attention(q, flat_k, flat_v, 95, 10, 0.125)
    with pytest.raises(RuntimeError, match="must hold the chunk's keys"):
        cpu_ops.prefill_attention(q, flat_k, flat_v, 0, 5, 0.125)  # fewer keys than queries
    with pytest.raises(RuntimeError, match="head shapes"):
        cpu_ops.prefill_attention(torch.randn(10, 3, 64), flat_k, flat_v, 0, 10, 0.125)
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_ops.prefill_attention(q.bfloat16(), flat_k, flat_v, 0, 10, 0.125)
