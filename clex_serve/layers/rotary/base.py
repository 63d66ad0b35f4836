"""Rotary position embeddings: one base class, one subclass per scaling scheme (see ``factory.get_rope``).

Frequencies may depend on the length of the sequence they rotate (CLEX's scale ``t``, dynamic NTK). Each
subclass maps a sequence length to an integer *scale* and a scale to its inverse frequencies; the engine
keeps the scale each sequence's cached keys were rotated with and re-rotates them when it changes.
Schemes whose frequencies do not depend on length have the single scale 1.

Two ways to treat cached keys when the scale changes: CLEX re-rotates them (``cache_follows_scale``, as
its official code rotates every key with the current scale at every step); dynamic NTK leaves each key
with the frequencies it was written with, as transformers and vLLM do.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` [tokens, heads, head_dim]; the rest pass through.

    ``cos``/``sin`` are [tokens, rotary_dim] in the rotate-half layout ``cat(angles, angles)``.
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


class RotaryEmbedding(nn.Module):
    """Plain RoPE: ``inv_freq[i] = base ** (-2i / d)``, one scale for every length."""

    cache_follows_scale = True  # cached keys are re-rotated to a sequence's new scale

    def __init__(self, rotary_dim: int, base: float, max_position_embeddings: int) -> None:
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"the rotary dimension must be even, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.base = base
        self.max_position_embeddings = max_position_embeddings
        # Multiplies cos and sin (YaRN's attention factor); 1 for every other scheme.
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", self._compute_inv_freq(), persistent=False)

    def _base_inv_freq(self, base: float | None = None) -> torch.Tensor:
        base = self.base if base is None else base
        # Always computed on the CPU in float32 (then moved): also under the loader's meta-device context,
        # where the power would go through slow Python decompositions.
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device="cpu").float() / self.rotary_dim
        return 1.0 / (base**exponents)

    def _compute_inv_freq(self) -> torch.Tensor:
        return self._base_inv_freq()

    def scale_for_length(self, seq_len: int) -> int:
        """The scale that a forward pass leaving the sequence ``seq_len`` tokens long rotates with."""
        return 1

    def inv_freq_for_scale(self, scale: int) -> torch.Tensor:
        """Inverse frequencies [rotary_dim / 2], float32, for ``scale``."""
        return self.inv_freq

    def scale_table(self) -> torch.Tensor | None:
        """Every scale's inverse frequencies, row ``scale - 1`` for ``scale``, or None when the scales are
        unbounded. A CUDA graph gathers each sequence's row from this table on the device, so a scale change
        needs no recapture."""
        return self.inv_freq[None, :]

    def finalize(self) -> None:
        """Called once after the weights are loaded, for schemes that derive tables from them."""

    def cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tokens, rotary_dim] in float32 for ``positions`` [tokens] rotated by per-token
        ``inv_freq`` [tokens, rotary_dim / 2] (or one row shared by all tokens)."""
        angles = positions.float()[:, None] * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin
