"""Mixtral's sparse mixture of experts: softmax router, top-k experts, weights renormalised over the k."""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.layers.mlp import GatedMLP


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, act: str) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        # Each expert is a gated MLP; checkpoints name its projections w1 (gate), w3 (up), w2 (down).
        self.experts = nn.ModuleList(GatedMLP(hidden_size, intermediate_size, act) for _ in range(num_experts))

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
