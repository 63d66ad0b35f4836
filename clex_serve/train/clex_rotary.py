"""Rotary embeddings for training with transformers' ``LlamaForCausalLM``: CLEX or plain RoPE.

It replaces ``model.model.rotary_emb``, whose ``forward(x, position_ids)`` must return ``(cos, sin)`` of
shape [batch, seq, head_dim] in ``x``'s dtype. The step's positions and scale are set with ``set_step``
instead of being passed as ``position_ids``: transformers reads non-contiguous ``position_ids`` as packed
sequences and would change the attention mask, while CLEX's positions have gaps on purpose.
"""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.layers.rotary.clex_ode import ClexODE


class CachedNtkClexODE(ClexODE):
    """``ClexODE`` with its NTK terms memoised by time point: they depend on ``t`` alone (no parameters), and
    the fixed RK4 grid visits the same time points every step, so training stops recomputing them (they are
    about half the forward cost of the solve). Same function, same floats: the solution is bit-identical."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ntk_cache: dict[tuple[float, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _ntk_terms(self, t: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (float(t), str(device))
        if key not in self._ntk_cache:
            self._ntk_cache[key] = super()._ntk_terms(t, device)
        return self._ntk_cache[key]


class TrainingRotary(nn.Module):
    """``use_clex=False`` is plain RoPE at the given positions; with CLEX, scale ``t > 1`` rotates with
    ``exp`` of the ODE solved from 1 to ``t`` (differentiable), and ``t == 1`` with the base ``inv_freq``."""

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        use_clex: bool,
        param_factor: int = 1,
        act: str = "silu",
        time_dt: float = 0.01,
    ) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (rope_theta**exponents), persistent=True)
        self.use_clex = use_clex
        self.proj_func = CachedNtkClexODE(head_dim, param_factor, act, time_dt) if use_clex else None
        if self.proj_func is not None:
            self.proj_func.reset_parameters()
        self._positions: torch.Tensor | None = None
        self._scale = 1

    def set_step(self, positions: torch.Tensor, scale: int = 1) -> None:
        """Positions [seq] (float32, shared by the batch) and the integer scale of the next forward."""
        if scale != 1 and not self.use_clex:
            raise ValueError("a scale other than 1 needs CLEX; plain RoPE has one set of frequencies")
        self._positions = positions
        self._scale = scale

    def scaled_inv_freq(self) -> torch.Tensor:
        if self._scale == 1:
            return self.inv_freq
        grid = torch.tensor([1.0, float(self._scale)], device=self.inv_freq.device)
        return self.proj_func.solve(self.inv_freq, grid)[-1]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = position_ids.shape[-1]
        positions = self._positions
        if positions is None or positions.shape[0] != seq_len:
            positions = torch.arange(seq_len, dtype=torch.float32)  # e.g. a forward outside the trainer
        angles = positions.to(x.device)[:, None] * self.scaled_inv_freq()[None, :]
        emb = torch.cat((angles, angles), dim=-1)[None]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
