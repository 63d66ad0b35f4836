"""The activations named by ``hidden_act`` in the supported configs, and the gated ``act(gate) * up`` of MLPs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class ActAndMul(nn.Module):
    """``act(gate) * up`` over a packed ``[..., 2 * width]`` gate/up projection (vLLM's ``SiluAndMul``). Its own
    module so that a device's fused kernel replaces it where the model is prepared for the device."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.act = get_activation(name)
        self.is_silu = name in ("silu", "swish")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up
