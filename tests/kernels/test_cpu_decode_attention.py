"""The C++ decode attention (every decode of a step in one call) against attention per sequence with
PyTorch's fused kernel over the same runs of the pool, and against float64."""

import pytest
import torch

from clex_serve.attention import segments
from clex_serve.attention.metadata import flat_slots
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here")

# Runs of slots per sequence: one key, a run shorter than a tile, several runs of uneven lengths, a long one.
SEQUENCES = [[(40, 41)], [(0, 13)], [(100, 180), (300, 317), (20, 39)], [(400, 1400)]]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (8, 2, 80), (4, 1, 16), (4, 2, 128)])
def test_decode_attention_equals_attention_per_sequence(dtype, tolerance, head_major, heads, kv_heads, head_dim):
    generator = torch.Generator().manual_seed(3)
    slots = 1408
    shape = (kv_heads, slots, head_dim) if head_major else (slots // 16, 16, kv_heads, head_dim)
    k_pool, v_pool = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
    flat_k, flat_v = flat_slots(k_pool), flat_slots(v_pool)
    q = torch.randn(len(SEQUENCES), heads, head_dim, generator=generator).to(dtype)
    runs = torch.tensor([run for sequence in SEQUENCES for run in sequence], dtype=torch.long)
    offsets = torch.tensor([0, 1, 2, 5, 6], dtype=torch.long)
    out = cpu_ops.decode_attention(q, flat_k, flat_v, runs, offsets, head_dim**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    for index, sequence in enumerate(SEQUENCES):
        exact = segments.decode_one(q[index].double(), flat_k.double(), flat_v.double(), sequence)
        fused = segments.decode_one(q[index], flat_k, flat_v, sequence)
        # As close to float64 as PyTorch's fused kernel is, to the dtype's rounding.
        torch.testing.assert_close(out[index].double(), exact, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(out[index], fused, atol=tolerance, rtol=tolerance)


def test_large_scores_do_not_overflow():
    # Scores far apart: the running maximum keeps every exponential at most 1.
    q = torch.full((1, 1, 16), 30.0)
    keys = torch.cat([torch.full((10, 1, 16), -3.0), torch.full((70, 1, 16), 3.0)])
    values = torch.arange(80, dtype=torch.float32)[:, None, None].expand(80, 1, 16).contiguous()
    out = cpu_ops.decode_attention(q, keys, values, torch.tensor([[0, 80]]), torch.tensor([0, 1]), 0.25)
    expected = segments.decode_one(q[0], keys, values, [(0, 80)])
    torch.testing.assert_close(out[0], expected)
    assert torch.isfinite(out).all()


def test_shapes_past_the_kernel_go_run_by_run():
    from clex_serve.attention.cpu import decode_kernel_fits

    q, flat_k = torch.zeros(1, 4, 320), torch.zeros(8, 4, 320)
    assert not decode_kernel_fits(head_dim=320, num_heads=4, num_kv_heads=4)
    assert decode_kernel_fits(head_dim=128, num_heads=32, num_kv_heads=8)
    with pytest.raises(RuntimeError, match="head shapes not supported"):
        cpu_ops.decode_attention(q, flat_k, flat_k, torch.tensor([[0, 8]]), torch.tensor([0, 1]), 0.1)
