"""CLEX rotary embedding: frequencies from a learned ODE, one table row per integer scale ``t``."""

from __future__ import annotations

import logging
import math

import torch

from clex_serve.config import RopeScaling
from clex_serve.layers.rotary.base import RotaryEmbedding
from clex_serve.layers.rotary.clex_ode import ClexODE

logger = logging.getLogger(__name__)


def clex_scale_for_length(seq_len: int, base_window: int, max_factor: int) -> int:
    """CLEX's scale schedule: t(L) = min(ceil(L / L0), max_factor), at least 1."""
    return max(1, min(math.ceil(seq_len / base_window), max_factor))


class ClexRotaryEmbedding(RotaryEmbedding):
    """Scale ``t(L) = min(ceil(L / L0), max_factor)``; ``t == 1`` is exactly the base ``inv_freq``.

    The ODE is solved once, in ``finalize`` after the weights (projection and, when the checkpoint stores it,
    ``inv_freq``) are loaded, on the grid ``1..max_factor``; afterwards a scale is a row lookup.
    """

    def __init__(self, rotary_dim: int, base: float, max_position_embeddings: int, scaling: RopeScaling) -> None:
        super().__init__(rotary_dim, base, max_position_embeddings)
        self.max_factor = scaling.max_factor
        self.proj_func = ClexODE(rotary_dim, scaling.param_factor, scaling.act, scaling.time_dt)
        # Persistent, unlike the base class: released checkpoints store inv_freq (possibly bf16-rounded) and
        # the official code rotates with the stored values.
        self.register_buffer("inv_freq", self._compute_inv_freq(), persistent=True)
        self.register_buffer("scaled_inv_freq", torch.zeros(self.max_factor, rotary_dim // 2), persistent=False)

    def scale_for_length(self, seq_len: int) -> int:
        return clex_scale_for_length(seq_len, self.max_position_embeddings, self.max_factor)

    def inv_freq_for_scale(self, scale: int) -> torch.Tensor:
        return self.scaled_inv_freq[scale - 1]

    def scale_table(self) -> torch.Tensor:
        return self.scaled_inv_freq

    @torch.no_grad()
    def finalize(self) -> None:
        # Solved in float32 whatever the model's dtype: that is where the official numbers come from.
        inv_freq = self.inv_freq.float()
        grid = torch.arange(1.0, self.max_factor + 1.0, dtype=torch.float32, device=inv_freq.device)
        table = self.proj_func.solve(inv_freq, grid)
        table[0] = inv_freq  # t == 1 uses the base frequencies exactly, not their round trip through log/exp
        broken = (~torch.isfinite(table)).any(dim=1).nonzero()
        if len(broken):
            first = int(broken[0]) + 1
            logger.warning(
                "this checkpoint's CLEX ODE gives frequencies that are not finite from scale %d on: "
                "outputs of sequences past %d tokens will be NaN",
                first,
                (first - 1) * self.max_position_embeddings,
            )
        self.inv_freq = inv_freq
        self.scaled_inv_freq = table
