"""RMSNorm in one kernel, optionally with the residual add before it (vLLM's ``fused_add_rms_norm``).

Computes what ``layers.norm.RMSNorm`` computes: normalise in float32, round to the input dtype, multiply by
the weight and round to the output dtype; with a residual, the sum is rounded to the dtype first and
returned as the new residual, as ``hidden + residual`` would be.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    stride_x,
    stride_residual,
    stride_out,
    stride_sum,
    num_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    x = x.to(tl.float32)
    inverse_rms = tl.rsqrt(tl.sum(x * x, 0) / num_cols + eps)
    normed = (x * inverse_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * normalise(x)`` for x [rows, hidden]; with ``residual``, (that of ``x + residual``, the sum)."""
    rows, cols = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm needs rows with contiguous columns")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(rows, cols, dtype=out_dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else out
    block = triton.next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        total,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        total.stride(0),
        cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return (out, total) if residual is not None else out
