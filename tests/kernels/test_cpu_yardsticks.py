"""The benchmark's yardstick kernels (csrc/yardsticks.cpp) read every element once and run the instructions
they claim: the stream's sum is the tensor's for every thread count and for lengths that are not whole
shares, and the peak kernels' chains compute what their arithmetic gives."""

import pytest
import torch

from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available

pytestmark = [
    pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here"),
    pytest.mark.usefixtures("each_cpu_isa"),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("length", [1, 127, 4096, 1_000_003])
def test_the_stream_reads_every_element_once(threads, length):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.arange(length, dtype=torch.float32) % 7  # small integers: every order sums exactly
        assert cpu_ops.stream_read(data) == float(data.double().sum())
    finally:
        torch.set_num_threads(previous)


def test_the_fma_chains_converge_to_their_fixed_point():
    # acc = 0.999 acc + 1e-4 tends to 0.1 in every lane of every chain, summed per thread: 24 chains of 16
    # lanes on AVX-512, 12 of 8 on AVX2 (its 16 registers; each chain runs twice an iteration).
    chains = 24 if cpu_ops.cpu_isa() == "avx512" else 12
    expected = torch.get_num_threads() * chains * cpu_ops.vector_lanes() * 0.1
    assert cpu_ops.fma_peak(100_000) == pytest.approx(expected, rel=1e-3)


def test_the_bf16_dot_chains_add_their_pairs():
    # Asked here, not at collection: the AVX2 pass of an AVX512_BF16 CPU has no vdpbf16ps either.
    if not cpu_ops.bf16_dot_supported():
        pytest.skip("no AVX512_BF16 in this ISA")
    # Each vdpbf16ps adds two products 1.0 * 2^-15 per lane: 2 * 2^-15 * iterations more per lane (starting
    # values 0.001 c per chain c), summed over 24 chains of 16 lanes.
    iterations = 1000
    lanes = 24 * 16
    start = 16 * sum(0.001 * chain for chain in range(24))
    expected = torch.get_num_threads() * (lanes * 2 * 2**-15 * iterations + start)
    assert cpu_ops.bf16_dot_peak(iterations) == pytest.approx(expected, rel=1e-4)


@pytest.mark.skipif(not cpu_kernels_available() or not cpu_ops.amx_bf16_supported(), reason="no AMX here")
def test_the_amx_chains_multiply_their_tiles():
    # Each tdpbf16ps adds 32 products 2^-7 * 2^-7 to every element of tile 0.
    iterations = 1000
    assert cpu_ops.amx_bf16_peak(iterations) == pytest.approx(torch.get_num_threads() * iterations * 32 * 2**-14)
