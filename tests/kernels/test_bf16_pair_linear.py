"""bfloat16 linear layers on vdpbf16ps (csrc/bf16_pair_linear.cpp): weights in input pairs give PyTorch's
bfloat16 linear within one rounding of the output, for odd input sizes (a zero column padded), partial
blocks, every row count the kernel takes, with and without bias, the same bits on any number of threads;
CpuLinear lays bfloat16 out in pairs exactly where the CPU has AVX512_BF16."""

import pytest
import torch
from torch import nn

from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available
from clex_serve.kernels.cpu_linear import replace_cpu_linear_layers, to_blocked, to_pairs

pytestmark = pytest.mark.skipif(
    not cpu_kernels_available() or not cpu_ops.bf16_dot_supported(), reason="no AVX512_BF16 kernels here"
)


@pytest.fixture(params=["vdpbf16ps past 2 rows", "FMAs past 2 rows"])
def dot_rows(request):
    """Both ways of multiplying more than two rows, whichever this CPU takes by default."""
    previous = cpu_ops.bf16_dot_rows()
    cpu_ops.select_bf16_dot_rows(1 << 40 if request.param.startswith("vdpbf16ps") else 2)
    yield request.param
    cpu_ops.select_bf16_dot_rows(previous)


@pytest.mark.usefixtures("dot_rows")
@pytest.mark.parametrize(("outputs", "inputs"), [(1000, 1408), (130, 65), (40, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_pairs_give_pytorchs_bf16_linear_within_one_rounding(outputs, inputs, with_bias):
    torch.manual_seed(outputs + inputs)
    weight = torch.randn(outputs, inputs, dtype=torch.bfloat16)
    bias = torch.randn(outputs, dtype=torch.bfloat16) if with_bias else None
    padded_bias = to_blocked(bias[:, None]).flatten() if with_bias else None
    for rows in [*range(1, 9), 16, 40]:
        x = torch.randn(rows, inputs, dtype=torch.bfloat16)
        out = cpu_ops.blocked_linear(x, to_pairs(weight), padded_bias, outputs)
        exact = nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
        # float32 sums of exact products, one rounding to bfloat16 (2^-8 relative) at the store.
        torch.testing.assert_close(out.double(), exact, atol=inputs**0.5 * 2e-3, rtol=2**-8)
        reference = nn.functional.linear(x, weight, bias)  # PyTorch's bfloat16 linear
        torch.testing.assert_close(out.float(), reference.float(), atol=2e-2 * inputs**0.5, rtol=1.6e-2)


AMX = cpu_kernels_available() and cpu_ops.bf16_dot_supported() and cpu_ops.amx_bf16_supported()


@pytest.mark.skipif(not AMX, reason="no AMX bfloat16 tiles here")
def test_three_to_sixteen_rows_on_amx_tiles_round_once_and_do_not_depend_on_each_other():
    torch.manual_seed(4)
    weight, bias = torch.randn(200, 1408, dtype=torch.bfloat16), torch.randn(200, dtype=torch.bfloat16)
    pairs, padded_bias = to_pairs(weight), to_blocked(bias[:, None]).flatten()
    x = torch.randn(16, 1408, dtype=torch.bfloat16)
    full = cpu_ops.blocked_linear(x, pairs, padded_bias, 200)
    exact = nn.functional.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(full.double(), exact, atol=1408**0.5 * 2e-3, rtol=2**-8)
    for rows in (3, 7, 15):
        assert torch.equal(cpu_ops.blocked_linear(x[:rows], pairs, padded_bias, 200), full[:rows])
    # AMX takes a CPU layer up to 16 rows through the blocked kernel, past that through the prompt GEMM.
    model = nn.Sequential(nn.Linear(1408, 200).to(torch.bfloat16))
    replace_cpu_linear_layers(model, blocked=True)
    assert model[0].max_blocked_rows == 16


@pytest.mark.skipif(not AMX, reason="no AMX bfloat16 tiles here")
@pytest.mark.parametrize(
    ("rows", "outputs", "inputs"), [(7000, 96, 64), (33, 1536, 512), (45, 64, 96), (17, 200, 1408)]
)
def test_prompt_gemm_on_amx_tiles_rounds_once_and_rows_do_not_depend_on_each_other(rows, outputs, inputs):
    # Row counts past a whole 32 (a tile of 16 and one of 1), column counts past a whole 32 and 64.
    torch.manual_seed(rows + outputs)
    weight, bias = torch.randn(outputs, inputs, dtype=torch.bfloat16), torch.randn(outputs, dtype=torch.bfloat16)
    pairs, padded_bias = to_pairs(weight), to_blocked(bias[:, None]).flatten()
    x = torch.randn(rows, inputs, dtype=torch.bfloat16)
    out = cpu_ops.amx_gemm(x, pairs, padded_bias, outputs)
    exact = nn.functional.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), exact, atol=inputs**0.5 * 2e-3, rtol=2**-8)
    reference = nn.functional.linear(x, weight, bias)  # PyTorch's bfloat16 linear (oneDNN)
    torch.testing.assert_close(out.float(), reference.float(), atol=2e-2 * inputs**0.5, rtol=1.6e-2)
    assert torch.equal(cpu_ops.amx_gemm(x[1:2], pairs, padded_bias, outputs), out[1:2])
    threads = torch.get_num_threads()
    try:  # the rows shared out among threads otherwise: the same bits
        torch.set_num_threads(1)
        assert torch.equal(cpu_ops.amx_gemm(x, pairs, padded_bias, outputs), out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not AMX, reason="no AMX bfloat16 tiles here")
def test_a_bf16_layer_on_amx_keeps_one_copy_of_its_weight():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(512, 300).to(torch.bfloat16), nn.Linear(65, 64).to(torch.bfloat16))
    x, odd = torch.randn(200, 512, dtype=torch.bfloat16), torch.randn(200, 65, dtype=torch.bfloat16)
    expected, expected_odd = model[0](x), model[1](odd)
    replace_cpu_linear_layers(model, blocked=True)
    assert model[0].amx and model[0].packed_weight is None and model[0].weight.numel() == 0
    torch.testing.assert_close(model[0](x).float(), expected.float(), atol=2e-2 * 512**0.5, rtol=1.6e-2)
    # An input size the tiles do not take keeps oneDNN's copy for its prompts.
    assert not model[1].amx and model[1].packed_weight is not None
    torch.testing.assert_close(model[1](odd).float(), expected_odd.float(), atol=2e-1, rtol=1.6e-2)


@pytest.mark.parametrize("inputs", [1400, 65])
def test_more_than_two_rows_give_the_blocked_kernels_bits(inputs):
    # Where vdpbf16ps issues at half an FMA's rate, past two rows the pairs are multiplied with float32 FMAs
    # in the blocked kernel's order, where AMX does not take them (input sizes not a multiple of 32, as
    # here, or no tiles).
    previous = cpu_ops.bf16_dot_rows()
    cpu_ops.select_bf16_dot_rows(2)
    try:
        check_fma_rows_give_the_blocked_kernels_bits(inputs)
    finally:
        cpu_ops.select_bf16_dot_rows(previous)


def check_fma_rows_give_the_blocked_kernels_bits(inputs):
    torch.manual_seed(3)
    weight, bias = torch.randn(200, inputs, dtype=torch.bfloat16), torch.randn(200, dtype=torch.bfloat16)
    padded_bias = to_blocked(bias[:, None]).flatten()
    for rows in (3, 6, 7, 20):
        x = torch.randn(rows, inputs, dtype=torch.bfloat16)
        pairs = cpu_ops.blocked_linear(x, to_pairs(weight), padded_bias, 200)
        assert torch.equal(pairs, cpu_ops.blocked_linear(x, to_blocked(weight), padded_bias, 200))


@pytest.mark.usefixtures("dot_rows")
def test_pairs_give_the_same_bits_on_any_number_of_threads():
    torch.manual_seed(0)
    weight = torch.randn(100, 255, dtype=torch.bfloat16)  # 2 blocks, one partial; odd K
    pairs = to_pairs(weight)
    threads = torch.get_num_threads()
    try:
        for rows in (1, 7, 13):
            x = torch.randn(rows, 255, dtype=torch.bfloat16)
            results = []
            for count in (1, 3):
                torch.set_num_threads(count)
                results.append(cpu_ops.blocked_linear(x, pairs, None, 100))
            assert torch.equal(results[0], results[1])
    finally:
        torch.set_num_threads(threads)


def test_a_pair_layout_refuses_float32_inputs():
    pairs = to_pairs(torch.randn(64, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_ops.blocked_linear(torch.randn(1, 32), pairs, None, 64)


def test_cpu_linear_lays_bf16_out_in_pairs_and_float32_in_blocks():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(64, 96).to(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = model[1](x)
    replace_cpu_linear_layers(model, blocked=True)
    assert model[0].blocked_weight.shape == (2, 64, 64)
    assert model[1].blocked_weight.shape == (2, 32, 64, 2)
    torch.testing.assert_close(model[1](x).float(), expected.float(), atol=2e-2, rtol=1.6e-2)


def test_where_vdpbf16ps_runs_at_the_fma_rate_the_kernel_takes_batches_up_to_256_rows():
    model = nn.Sequential(nn.Linear(512, 300).to(torch.bfloat16))
    replace_cpu_linear_layers(model, blocked=True)
    if cpu_ops.amx_bf16_supported():
        assert model[0].max_blocked_rows == 16
    elif cpu_ops.bf16_dot_at_fma_rate():
        assert cpu_ops.bf16_dot_rows() > 256 and model[0].max_blocked_rows == 256
    else:
        assert cpu_ops.bf16_dot_rows() == 2 and model[0].max_blocked_rows == 6
