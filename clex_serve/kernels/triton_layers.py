"""The CUDA path's RMSNorm and gated activation: the Triton kernels (``rms_norm``, ``silu_and_mul``) in place
of the PyTorch modules, swapped in once where a CUDA model is prepared (``device_layers``) with triton
installed."""

from __future__ import annotations

import torch

from clex_serve.kernels.rms_norm import rms_norm
from clex_serve.kernels.silu_and_mul import silu_and_mul
from clex_serve.layers.activation import ActAndMul
from clex_serve.layers.norm import RMSNorm


class TritonRMSNorm(RMSNorm):
    """RMSNorm, with the residual add before it, in one kernel."""

    @classmethod
    def replacing(cls, norm: RMSNorm) -> TritonRMSNorm:
        triton = cls(norm.weight.shape[0], norm.eps)
        triton.weight = norm.weight
        return triton

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class TritonSiluAndMul(ActAndMul):
    """``silu(gate) * up`` in one kernel over the packed projection."""

    def __init__(self) -> None:
        super().__init__("silu")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dim() != 2:
            return super().forward(gate_up)
        return silu_and_mul(gate_up)
