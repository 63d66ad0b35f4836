"""CPU linear layers in their prepared layouts (blocked, oneDNN packed) compute what ``F.linear`` does, for
any number of rows, with and without bias, for output sizes that are not whole blocks."""

import pytest
import torch
from torch import nn

from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available
from clex_serve.kernels.cpu_linear import (
    BLOCKED_MAX_ROWS,
    BLOCKED_MAX_ROWS_WITHOUT_ONEDNN_BF16,
    ONEDNN_FLOAT32_MIN_ROWS,
    onednn_available,
    replace_cpu_linear_layers,
    to_blocked,
)

LAYOUTS = [
    pytest.param(True, marks=pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here")),
    pytest.param(False, marks=pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN")),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
pytestmark = pytest.mark.usefixtures("each_cpu_isa")


def test_the_cpu_kernels_build_where_the_ci_runs():
    # The machines this project runs its tests on are x86-64 with AVX2 (or AVX-512) and a compiler: the fast
    # path must not silently fall back there. Elsewhere the fallback is tested below.
    import platform

    if platform.machine() != "x86_64" or "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("not an x86-64 machine with AVX2")
    assert cpu_kernels_available()


@pytest.mark.parametrize("blocked", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_layers_equal_plain_ones_for_any_row_count(blocked, dtype):
    torch.manual_seed(0)
    # 96 and 130 outputs: a whole block plus a part, a part of a block past two whole ones; 40 outputs: one
    # partial block, which the kernel also splits by rows so that both threads work.
    model = nn.Sequential(
        nn.Linear(64, 96, bias=True), nn.Linear(96, 130, bias=False), nn.Linear(130, 40, bias=True)
    ).to(dtype)
    # ONEDNN_FLOAT32_MIN_ROWS: a float32 prompt's GEMM on oneDNN's packing of the blocked weight.
    row_counts = sorted(
        {1, 3, BLOCKED_MAX_ROWS[dtype], BLOCKED_MAX_ROWS[dtype] + 1, 16, 70, BLOCKED_MAX_ROWS_WITHOUT_ONEDNN_BF16 + 1}
        | {ONEDNN_FLOAT32_MIN_ROWS}
    )
    inputs = {rows: torch.randn(rows, 64, dtype=dtype) for rows in row_counts}
    expected = {rows: model(x).float() for rows, x in inputs.items()}
    # Without the blocked kernel, bfloat16 layers stay F.linear where oneDNN has no bf16 path (AVX2 CPUs).
    swapped = 3 if blocked or onednn_available(dtype) else 0
    assert replace_cpu_linear_layers(model, blocked=blocked) == swapped
    assert replace_cpu_linear_layers(model, blocked=blocked) == 0  # a second runner over the model: no change
    for rows, x in inputs.items():
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(model(x).float(), expected[rows], atol=tolerance, rtol=tolerance)
    assert model(torch.randn(2, 5, 64, dtype=dtype)).shape == (2, 5, 40)  # leading dimensions kept
    # Plain weights are dropped wherever another layout serves every row count; float32 without the blocked
    # kernel keeps its plain weight for MKL's single-row GEMV; bfloat16 without oneDNN's bf16 path widens its
    # blocked weight for large batches.
    keeps_plain = (not blocked and dtype == torch.float32) or swapped == 0
    assert (model[0].weight.numel() == 0) == (not keeps_plain)


@pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocked_kernel_accumulates_in_float32(dtype):
    # 1,408 inputs (the benchmark MLP's width), an uneven 1,000 outputs, every row count the kernel takes.
    torch.manual_seed(1)
    weight, bias = torch.randn(1000, 1408, dtype=dtype), torch.randn(1000, dtype=dtype)
    for rows in range(1, 9):
        x = torch.randn(rows, 1408, dtype=dtype)
        out = cpu_ops.blocked_linear(x, to_blocked(weight), to_blocked(bias[:, None]).flatten(), 1000)
        exact = nn.functional.linear(x.double(), weight.double(), bias.double())
        # float32 sums: within float32's rounding of a 1,408-term sum; bfloat16: one rounding of the output.
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), exact.to(dtype).double(), atol=tolerance * 40, rtol=tolerance)


@pytest.mark.parametrize("blocked", LAYOUTS)
def test_a_weight_shared_with_an_embedding_stays_in_place(blocked):
    embedding = nn.Embedding(50, 16).to(torch.bfloat16)
    model = nn.Sequential(nn.Linear(16, 50, bias=False).to(torch.bfloat16))
    model[0].weight = embedding.weight
    replace_cpu_linear_layers(model, shared={id(embedding.weight)}, blocked=blocked)
    head = model[0]
    assert head.weight is embedding.weight and embedding.weight.numel() == 800
    for rows in (1, 4, 20):
        x = torch.randn(rows, 16, dtype=torch.bfloat16)
        torch.testing.assert_close(head(x).float(), (x @ embedding.weight.t()).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocked_kernel_gives_the_same_bits_on_any_number_of_threads(dtype):
    """With fewer blocks than threads the rows are split between threads; no output changes by a bit."""
    torch.manual_seed(0)
    weight, bias = torch.randn(100, 256, dtype=dtype), torch.randn(128, dtype=dtype)  # 2 blocks, 1 partial
    blocked = to_blocked(weight)
    threads = torch.get_num_threads()
    try:
        for rows in (1, 7, 13, 40):
            x = torch.randn(rows, 256, dtype=dtype)
            results = []
            for count in (1, 3, 8):
                torch.set_num_threads(count)
                results.append(cpu_ops.blocked_linear(x, blocked, bias, 100))
            assert all(torch.equal(result, results[0]) for result in results[1:])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_however_many_rows_share_the_call(dtype):
    """7-32 rows walk each block in slices of k, keeping float32 partial sums between them; every sum still
    adds its k in order from the bias, so a row in a call of any size equals that row alone."""
    torch.manual_seed(2)
    # 1,000 inputs: slices of 64 and a last one of 40; 130 outputs: two blocks and a part.
    weight, bias = torch.randn(130, 1000, dtype=dtype), torch.randn(192, dtype=dtype)
    blocked = to_blocked(weight)
    x = torch.randn(40, 1000, dtype=dtype)
    alone = torch.cat([cpu_ops.blocked_linear(x[m : m + 1], blocked, bias, 130) for m in range(40)])
    for rows in (6, 7, 12, 16, 32, 33, 40):
        assert torch.equal(cpu_ops.blocked_linear(x[:rows], blocked, bias, 130), alone[:rows]), rows


@pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here")
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 32, 63), "w \\[N/64, K, 64\\] or"),  # blocks of 63 columns would be read as 64
        ((2, 31, 64), "with x's K"),
        ((2, 32, 64, 1), "w \\[N/64, K, 64\\] or"),
    ],
)
def test_the_blocked_kernel_rejects_a_weight_of_another_layout(shape, message):
    x = torch.randn(3, 32)
    with pytest.raises(RuntimeError, match=message):
        cpu_ops.blocked_linear(x, torch.randn(shape), None, 100)
