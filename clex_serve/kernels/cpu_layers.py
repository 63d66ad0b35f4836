"""The CPU's RMSNorm and gated activation: the C++ kernels (``cpu_ops``) in place of the PyTorch modules,
swapped in once where a CPU model is prepared (``device_layers``), for float32 and bfloat16 models where the
kernels build. Results are those of the modules they replace, to the last bit of the dtype."""

from __future__ import annotations

import torch

from clex_serve.kernels import cpu_ops
from clex_serve.layers.activation import ActAndMul
from clex_serve.layers.norm import RMSNorm


class CpuRMSNorm(RMSNorm):
    """RMSNorm, with the residual add before it, in one C++ call per step."""

    @classmethod
    def replacing(cls, norm: RMSNorm) -> CpuRMSNorm:
        cpu = cls(norm.weight.shape[0], norm.eps)
        cpu.weight = norm.weight
        return cpu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.dim() != 2 or x.dtype != self.weight.dtype:
            return super().forward(x, residual)
        out, total = cpu_ops.rms_norm(x, residual, self.weight, self.eps)
        return (out, total) if residual is not None else out


class CpuSiluAndMul(ActAndMul):
    """``silu(gate) * up`` in one C++ pass over the packed projection."""

    def __init__(self) -> None:
        super().__init__("silu")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dim() != 2:
            return super().forward(gate_up)
        return cpu_ops.silu_and_mul(gate_up)
