"""The kernels' AVX2 bodies against their AVX-512 ones: the instruction set is chosen at run time (and by
CLEX_SERVE_CPU_ISA), and where a CPU runs both, the element-wise kernels and the blocked linear layers give
the same bits on both (the same products summed in the same order), attention within float32's rounding."""

import os
import subprocess
import sys

import pytest
import torch

from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available
from clex_serve.kernels.cpu_linear import to_blocked

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here")


def has_avx512() -> bool:
    previous = cpu_ops.cpu_isa()
    try:
        return cpu_ops.select_cpu_isa("avx512") == "avx512"
    finally:
        cpu_ops.select_cpu_isa(previous)


def on_both(kernel):
    """kernel() run on AVX-512, then on AVX2."""
    previous = cpu_ops.cpu_isa()
    try:
        results = []
        for isa in ("avx512", "avx2"):
            assert cpu_ops.select_cpu_isa(isa) == isa
            results.append(kernel())
        return results
    finally:
        cpu_ops.select_cpu_isa(previous)


def test_the_isa_is_chosen_by_name_and_refused_when_unknown():
    previous = cpu_ops.cpu_isa()
    try:
        assert cpu_ops.select_cpu_isa("avx2") == "avx2" and cpu_ops.vector_lanes() == 8
        assert cpu_ops.select_cpu_isa("avx512") == ("avx512" if has_avx512() else "avx2")
        with pytest.raises(RuntimeError, match="'avx512' or 'avx2'"):
            cpu_ops.select_cpu_isa("sse2")
    finally:
        cpu_ops.select_cpu_isa(previous)


def isa_chosen_with(value: str) -> tuple[str, str]:
    """(the ISA a fresh process runs with CLEX_SERVE_CPU_ISA=value, what it logged)."""
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from clex_serve.kernels import cpu_extension, cpu_ops\n"
        "cpu_extension.cpu_kernels_available()\n"
        "print(cpu_ops.cpu_isa())"
    )
    env = {**os.environ, "CLEX_SERVE_CPU_ISA": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), out.stderr


def test_the_environment_variable_selects_the_isa():
    best = "avx512" if has_avx512() else "avx2"
    assert isa_chosen_with("avx2")[0] == "avx2"
    assert isa_chosen_with("AVX512")[0] == best
    # A value it does not know: a warning naming the variable, and the best this CPU has (no crash).
    isa, logged = isa_chosen_with("sse2")
    assert isa == best
    assert "CLEX_SERVE_CPU_ISA=sse2" in logged


avx512_only = pytest.mark.skipif(not cpu_kernels_available() or not has_avx512(), reason="this CPU has no AVX-512")


@avx512_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 40])
def test_blocked_linear_is_the_same_bits_on_both(dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 384, generator=generator).to(dtype)
    bias = torch.randn(200, generator=generator).to(dtype)
    x = torch.randn(rows, 384, generator=generator).to(dtype)
    blocked, blocked_bias = to_blocked(weight), to_blocked(bias[:, None]).flatten()
    wide, narrow = on_both(lambda: cpu_ops.blocked_linear(x, blocked, blocked_bias, 200))
    assert torch.equal(wide, narrow)


@avx512_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_element_wise_kernels_are_the_same_bits_on_both(dtype):
    generator = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(7, 2 * 300, generator=generator) * 30).to(dtype)  # exp far into both tails
    wide, narrow = on_both(lambda: cpu_ops.silu_and_mul(gate_up))
    assert torch.equal(wide, narrow)
    q, k, v = (torch.randn(5, heads, 80, generator=generator).to(dtype) for heads in (8, 2, 2))
    angles = torch.randn(5, 20, generator=generator)
    cos, sin = (f(torch.cat([angles, angles], dim=-1)).to(dtype) for f in (torch.cos, torch.sin))
    scale = torch.rand(5, generator=generator).to(dtype) + 1
    slots = torch.tensor([3, 9, 4, 0, 7])

    def rotate():
        k_cache, v_cache = torch.zeros(10, 2, 80, dtype=dtype), torch.zeros(10, 2, 80, dtype=dtype)
        return (*cpu_ops.rotate_and_cache(q, k, v, cos, sin, scale, slots, k_cache, v_cache), k_cache, v_cache)

    for wide_part, narrow_part in zip(*on_both(rotate), strict=True):
        assert torch.equal(wide_part, narrow_part)
    logits = torch.randn(6, 1001, generator=generator)
    logits[2, 500] = float("nan")
    wide, narrow = on_both(lambda: cpu_ops.argmax_rows(logits))
    assert torch.equal(wide, narrow)


@avx512_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_decode_attention_agrees_on_both(dtype, head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    k_cache, v_cache = (torch.randn(600, 2, head_dim, generator=generator).to(dtype) for _ in range(2))
    q = torch.randn(3, 8, head_dim, generator=generator).to(dtype)
    runs = torch.tensor([[0, 70], [100, 400], [450, 451], [500, 600]])
    offsets = torch.tensor([0, 1, 3, 4])
    wide, narrow = on_both(lambda: cpu_ops.decode_attention(q, k_cache, v_cache, runs, offsets, head_dim**-0.5))
    # Scores are summed lane by lane in another order: float32 rounding, then the dtype's.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(wide, narrow, atol=tolerance, rtol=tolerance)
