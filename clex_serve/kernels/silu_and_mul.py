"""``silu(gate) * up`` over a packed ``[tokens, 2 * intermediate]`` gate/up projection, in one kernel, with
PyTorch's rounding: the activation is rounded to the dtype before the product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + width + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (activated * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, double_width = gate_up.shape
    if gate_up.stride(1) != 1:
        raise ValueError("silu_and_mul needs the last dimension contiguous")
    width = double_width // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    _silu_and_mul_kernel[(rows, triton.cdiv(width, _BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=_BLOCK, num_warps=4
    )
    return out
