"""Feed-forward blocks: the gated MLP of the Llama family and Mixtral experts, and Phi-2's two-layer MLP."""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.kernels import use_cpu_kernels, use_triton_kernels
from clex_serve.layers.activation import get_activation
from clex_serve.layers.linear import PackedLinear


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the Llama weight names."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = PackedLinear(hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size},
                                         bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(act)
        self.is_silu = act in ("silu", "swish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_silu and use_triton_kernels(x) and x.dim() == 2:
            from clex_serve.kernels.silu_and_mul import silu_and_mul

            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        if self.is_silu and use_cpu_kernels(x) and x.dim() == 2:
            return self.down_proj(torch.ops.clex_cpu.silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj.forward_split(x)
        return self.down_proj(self.act(gate) * up)


class PhiMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
