"""The fused Triton kernels of the CUDA path against the PyTorch code they replace (on the CPU through
Triton's interpreter, compiled on CUDA): float32 to rounding, bfloat16 to a few bfloat16 steps (the
interpreter rounds float32 to bfloat16 toward zero, where the GPU rounds to nearest as PyTorch does)."""

import pytest
import torch

from clex_serve.layers.norm import RMSNorm
from clex_serve.layers.rotary import apply_rotary

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2**-5)}
EXACT_BFLOAT16 = DEVICE == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    from clex_serve.kernels.rms_norm import rms_norm

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(5, 200, device=DEVICE, generator=generator).to(dtype)
    residual = torch.randn(5, 200, device=DEVICE, generator=generator).to(dtype)
    norm = RMSNorm(200, 1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(200, device=DEVICE, generator=generator) + 0.5)
        if with_residual:
            out, total = rms_norm(x, norm.weight, 1e-5, residual)
            exact = dtype == torch.float32 or EXACT_BFLOAT16
            torch.testing.assert_close(total, x + residual, **(dict(atol=0, rtol=0) if exact else TOLERANCE[dtype]))
            torch.testing.assert_close(out, norm._normalise(x + residual), **TOLERANCE[dtype])
        else:
            torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm._normalise(x), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    from clex_serve.kernels.silu_and_mul import silu_and_mul

    gate_up = torch.randn(3, 2 * 1500, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1)).to(dtype)
    gate, up = gate_up.split(1500, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rotary_dim,log_scale",
    [
        (4, 2, 16, 16, True),  # GQA with the CLEX log scale
        (4, 4, 80, 32, False),  # Phi-2's partial rotary
    ],
)
def test_rotate_and_cache(dtype, heads, kv_heads, head_dim, rotary_dim, log_scale):
    """Queries rotated and scaled as the unfused path does; keys rotated and values copied into their slots,
    no other slot touched."""
    from clex_serve.kernels.rotary_cache import rotate_and_cache

    generator = torch.Generator(device=DEVICE).manual_seed(2)
    tokens, num_blocks, block_size = 3, 6, 4
    packed = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE, generator=generator).to(dtype)
    q, k, v = packed.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(tokens, -1, head_dim) for t in (q, k, v))
    angles = torch.rand(tokens, rotary_dim // 2, device=DEVICE, generator=generator) * 6
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    query_scale = (
        (torch.rand(tokens, device=DEVICE, generator=generator) + 1).to(dtype)[:, None, None] if log_scale else None
    )
    slots = torch.tensor([5, 17, 2], device=DEVICE)
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)

    q_out = rotate_and_cache(q, k, v, cos, sin, query_scale, slots, k_cache, v_cache)
    expected_q = apply_rotary(q, cos, sin)
    if query_scale is not None:
        expected_q = expected_q * query_scale
    torch.testing.assert_close(q_out, expected_q, **TOLERANCE[dtype])
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    torch.testing.assert_close(flat_k[slots], apply_rotary(k, cos, sin), **TOLERANCE[dtype])
    torch.testing.assert_close(flat_v[slots], v, atol=0, rtol=0)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()
