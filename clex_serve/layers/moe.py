"""Mixtral's sparse mixture of experts: softmax router, top-k experts, weights renormalised over the k."""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.layers.activation import get_activation


class MixtralExpert(nn.Module):
    """One expert, with the checkpoint's names: ``w2(act(w1(x)) * w3(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, act: str) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(MixtralExpert(hidden_size, intermediate_size, act) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(routing, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        # Loop over experts that received tokens, not over tokens: one matmul per active expert.
        for expert_index in torch.unique(chosen).tolist():
            token_index, slot = torch.where(chosen == expert_index)
            expert_out = self.experts[expert_index](x[token_index]) * weights[token_index, slot, None]
            out.index_add_(0, token_index, expert_out)
        return out
