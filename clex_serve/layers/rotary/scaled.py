"""The plain-model RoPE scalings of transformers: linear, dynamic NTK, YaRN and Llama 3.

Each reproduces transformers' ``modeling_rope_utils`` arithmetic so that a model gives the logits of its
transformers class. Dynamic NTK is the one length-dependent scheme among them: its scale is the length.
"""

from __future__ import annotations

import math

import torch

from clex_serve.config import RopeScaling
from clex_serve.layers.rotary.base import RotaryEmbedding


class LinearScalingRotaryEmbedding(RotaryEmbedding):
    """Position interpolation: every position divided by ``factor``."""

    def __init__(self, rotary_dim: int, base: float, max_position_embeddings: int, scaling: RopeScaling) -> None:
        self.factor = scaling.factor
        super().__init__(rotary_dim, base, max_position_embeddings)

    def _compute_inv_freq(self) -> torch.Tensor:
        return self._base_inv_freq() / self.factor


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """NTK-aware base growth with the length: ``base * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))``.

    The scale is the length itself (at least ``L0``): each pass rotates its new tokens with the frequencies
    of the length it leaves, and cached keys keep the rotation they were written with (transformers' and
    vLLM's behaviour; a decode step costs nothing extra).
    """

    cache_follows_scale = False

    def __init__(self, rotary_dim: int, base: float, max_position_embeddings: int, scaling: RopeScaling) -> None:
        self.factor = scaling.factor
        super().__init__(rotary_dim, base, max_position_embeddings)
        self._inv_freq_by_length: dict[int, torch.Tensor] = {}

    def scale_for_length(self, seq_len: int) -> int:
        return max(seq_len, self.max_position_embeddings)

    def scale_table(self) -> None:
        return None  # one scale per length: no finite table

    def inv_freq_for_scale(self, scale: int) -> torch.Tensor:
        if scale <= self.max_position_embeddings:
            return self.inv_freq
        cached = self._inv_freq_by_length.get(scale)
        if cached is None:
            d = self.rotary_dim
            grown = self.base * ((self.factor * scale / self.max_position_embeddings) - (self.factor - 1)) ** (
                d / (d - 2)
            )
            cached = self._base_inv_freq(grown).to(self.inv_freq.device)
            if len(self._inv_freq_by_length) > 4096:
                self._inv_freq_by_length.clear()
            self._inv_freq_by_length[scale] = cached
        return cached


class YarnRotaryEmbedding(RotaryEmbedding):
    """YaRN: interpolate low frequencies, keep high ones, ramp between; cos/sin scaled by an attention factor."""

    def __init__(self, rotary_dim: int, base: float, max_position_embeddings: int, scaling: RopeScaling) -> None:
        self.scaling = scaling
        self.original_max = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        super().__init__(rotary_dim, base, max_position_embeddings)
        self.attention_scaling = self._attention_factor()

    def _attention_factor(self) -> float:
        factor = self.scaling.factor
        explicit = self.scaling.get("attention_factor")
        if explicit is not None:
            return float(explicit)

        def mscale_of(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        mscale, mscale_all_dim = self.scaling.get("mscale"), self.scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
        return mscale_of(factor)

    def _compute_inv_freq(self) -> torch.Tensor:
        dim, base, factor = self.rotary_dim, self.base, self.scaling.factor
        beta_fast = self.scaling.get("beta_fast") or 32
        beta_slow = self.scaling.get("beta_slow") or 1

        def correction_dim(num_rotations: float) -> float:
            return (dim * math.log(self.original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if self.scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extrapolation_factor = 1 - ramp
        return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


class Llama3RotaryEmbedding(RotaryEmbedding):
    """Llama 3.1: divide low frequencies by ``factor``, keep high ones, interpolate smoothly between."""

    def __init__(self, rotary_dim: int, base: float, max_position_embeddings: int, scaling: RopeScaling) -> None:
        self.scaling = scaling
        super().__init__(rotary_dim, base, max_position_embeddings)

    def _compute_inv_freq(self) -> torch.Tensor:
        inv_freq = self._base_inv_freq()
        factor = self.scaling.factor
        low_freq_factor = float(self.scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(self.scaling.get("high_freq_factor", 4.0))
        old_context_len = int(self.scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
