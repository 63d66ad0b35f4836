"""Bring a sequence's cached keys from one rotary scale to another, in place, once per scale change.

The official CLEX code caches keys unrotated and rotates all of them again at every step. Rotating
``R(new) R(old)^-1`` in place instead keeps one key per token and makes a decode step at an unchanged
scale cost nothing beyond attention. Both rotations come from the same float32 tables a fresh pass would
use, so the result equals rotating the unrotated key with the new table up to float32 rounding.
"""

from __future__ import annotations

import torch

from clex_serve.attention.metadata import cache_slot
from clex_serve.engine.kv_cache import KVCachePool
from clex_serve.layers.rotary import RotaryEmbedding
from clex_serve.layers.rotary.base import rotate_half

# Positions rotated per chunk, to bound the float32 working copy for very long sequences.
_CHUNK = 8192


def rerotate_cached_keys(pool: KVCachePool, rope: RotaryEmbedding, block_table: list[int], num_cached: int,
                         old_scale: int, new_scale: int) -> None:
    if old_scale == new_scale or num_cached == 0:
        return
    device = pool.tensor.device
    old_freq = rope.inv_freq_for_scale(old_scale)
    new_freq = rope.inv_freq_for_scale(new_scale)
    blocks = torch.tensor(block_table, dtype=torch.long, device=device)
    for start in range(0, num_cached, _CHUNK):
        positions = torch.arange(start, min(start + _CHUNK, num_cached), device=device)
        slots = cache_slot(blocks, positions, pool.block_size)
        cos_delta, sin_delta = _delta_rotation(positions, old_freq, new_freq)
        for layer in range(pool.num_layers):
            flat = pool.flat_keys(layer)
            keys = flat[slots]
            flat[slots] = _rotate(keys, cos_delta, sin_delta).to(flat.dtype)


def _delta_rotation(positions: torch.Tensor, old_freq: torch.Tensor,
                    new_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    old_angles = positions.float()[:, None] * old_freq
    new_angles = positions.float()[:, None] * new_freq
    old_cos, old_sin = old_angles.cos(), old_angles.sin()
    new_cos, new_sin = new_angles.cos(), new_angles.sin()
    # angle(new) - angle(old) through the addition formulas, from exactly the tables a fresh pass uses
    cos_delta = new_cos * old_cos + new_sin * old_sin
    sin_delta = new_sin * old_cos - new_cos * old_sin
    return torch.cat((cos_delta, cos_delta), -1), torch.cat((sin_delta, sin_delta), -1)


def _rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    keys = keys.float()
    rotated = keys[..., :rotary_dim]
    rotated = rotated * cos[:, None, :] + rotate_half(rotated) * sin[:, None, :]
    if rotary_dim == keys.shape[-1]:
        return rotated
    return torch.cat((rotated, keys[..., rotary_dim:]), dim=-1)
