"""Normalisation layers: RMSNorm (Llama, Mistral, Qwen2, Mixtral); Phi-2 uses torch's LayerNorm."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)`` (one kernel in the CUDA and CPU
        subclasses that replace this one where the model is prepared for its device)."""
        if residual is not None:
            x = x + residual
            return self._normalise(x), x
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the Llama reference does.
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)
