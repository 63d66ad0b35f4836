"""The C++ decode attention (every decode of a step in one call) against attention per sequence with
PyTorch's fused kernel over the same runs of the pool, and against float64."""

import pytest
import torch

from clex_serve.attention import segments
from clex_serve.attention.metadata import flat_slots
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available

pytestmark = [
    pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here"),
    pytest.mark.usefixtures("each_cpu_isa"),
]

# Runs of slots per sequence: one key, a run shorter than a tile, several runs of uneven lengths, a long one.
SEQUENCES = [[(40, 41)], [(0, 13)], [(100, 180), (300, 317), (20, 39)], [(400, 1400)]]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (8, 2, 80), (4, 1, 16), (4, 2, 128), (2, 1, 36)])
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


def verify_rows(runs: list[tuple[int, int]], count: int) -> list[list[tuple[int, int]]]:
    """The runs of ``count`` rows at consecutive positions whose last row reads ``runs``: row j sees all but
    the last ``count - 1 - j`` keys (a verify step's drafts, each a decode of its own)."""
    rows = []
    for j in range(count):
        drop, kept = count - 1 - j, []
        total = sum(end - start for start, end in runs) - drop
        for start, end in runs:
            if total <= 0:
                break
            kept.append((start, min(end, start + total)))
            total -= kept[-1][1] - start
        rows.append(kept)
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 80), (16, 1, 32)])
def test_rows_attended_together_equal_each_row_alone(dtype, heads, kv_heads, head_dim):
    # Groups: 5 rows whose last crosses a run's end (the tile boundary of one row is not the next row's),
    # 9 rows over two runs, a row alone, 17 rows of one run (more queries than the kernel holds at once, so
    # the group is attended in spans), and a group of 2 over a run of 2 keys.
    generator = torch.Generator().manual_seed(5)
    flat_k, flat_v = (torch.randn(2048, kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    groups = [
        verify_rows([(100, 163), (500, 566)], 5),
        verify_rows([(0, 64), (1000, 1129)], 9),
        [[(700, 900)]],
        verify_rows([(1200, 1900)], 17),
        verify_rows([(10, 12)], 2),
    ]
    rows = [row for group in groups for row in group]
    runs = torch.tensor([run for row in rows for run in row], dtype=torch.long)
    offsets = torch.tensor([0, *torch.tensor([len(row) for row in rows]).cumsum(0).tolist()], dtype=torch.long)
    bounds = torch.tensor([0, *torch.tensor([len(group) for group in groups]).cumsum(0).tolist()], dtype=torch.long)
    q = torch.randn(len(rows), heads, head_dim, generator=generator).to(dtype)
    alone = cpu_ops.decode_attention(q, flat_k, flat_v, runs, offsets, head_dim**-0.5)
    together = cpu_ops.decode_attention(q, flat_k, flat_v, runs, offsets, head_dim**-0.5, bounds)
    assert torch.equal(together, alone)
    # And alone is attention: row 0 of the first group sees 63 + 62 keys, not the group's 63 + 66.
    expected = segments.decode_one(q[0].double(), flat_k.double(), flat_v.double(), [(100, 163), (500, 562)])
    torch.testing.assert_close(together[0].double(), expected, atol=1e-2, rtol=1e-2)


def test_row_groups_must_cover_the_rows():
    q, flat_k = torch.zeros(2, 1, 16), torch.zeros(8, 1, 16)
    runs, offsets = torch.tensor([[0, 3], [0, 4]]), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="row_groups"):
        cpu_ops.decode_attention(q, flat_k, flat_k, runs, offsets, 0.1, torch.tensor([0, 1]))


def test_row_groups_become_offsets_over_the_decodes():
    from clex_serve.attention.cpu import decode_row_groups

    # A prompt chunk, a decode alone, a verify step of three rows, a decode alone.
    assert decode_row_groups([1, 1, 3, 1], [7, 1, 1, 1, 1, 1]).tolist() == [0, 1, 4, 5]
    assert decode_row_groups([1, 1], [1, 1]) is None
    assert decode_row_groups(None, [1, 1]) is None
