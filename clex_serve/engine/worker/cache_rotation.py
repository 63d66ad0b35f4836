"""Bring a sequence's cached keys from one rotary scale to another, in place, once per scale change.

The official CLEX code caches keys unrotated and rotates all of them again at every step. Rotating
``R(new) R(old)^-1`` in place instead keeps one key per token and makes a decode step at an unchanged
scale cost nothing beyond attention. Both rotations come from the same float32 tables a fresh pass would
use, so the result equals rotating the unrotated key with the new table up to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clex_serve.attention.metadata import cache_slot
from clex_serve.engine.worker.kv_cache import KVCachePool
from clex_serve.layers.rotary import RotaryEmbedding
from clex_serve.layers.rotary.base import rotate_half

# Positions rotated per chunk, to bound the float32 working copy for very long sequences.
_CHUNK = 8192


@dataclass(frozen=True)
class Rerotation:
    """One sequence's cached keys to bring from ``old_scale`` to ``new_scale``."""

    block_table: list[int]
    num_cached: int
    old_scale: int
    new_scale: int


def rerotate_all(pool: KVCachePool, rope: RotaryEmbedding, jobs: list[Rerotation]) -> None:
    """Every sequence of a step that changes scale, in one pass per layer: their slots, positions and
    frequency rows are concatenated, so the cost is a few tensor ops per layer however many sequences
    cross a scale boundary together (as streams that started together do)."""
    jobs = [job for job in jobs if job.old_scale != job.new_scale and job.num_cached > 0]
    if not jobs:
        return
    device = pool.tensor.device
    freq_rows = {scale: rope.inv_freq_for_scale(scale) for job in jobs for scale in (job.old_scale, job.new_scale)}
    slots, positions, old_rows, new_rows = [], [], [], []
    for job in jobs:
        job_positions = torch.arange(job.num_cached, device=device)
        blocks = torch.tensor(job.block_table, dtype=torch.long, device=device)
        slots.append(cache_slot(blocks, job_positions, pool.block_size))
        positions.append(job_positions)
        old_rows.append(freq_rows[job.old_scale].expand(job.num_cached, -1))
        new_rows.append(freq_rows[job.new_scale].expand(job.num_cached, -1))
    slots, positions = torch.cat(slots), torch.cat(positions)
    old_freq, new_freq = torch.cat(old_rows), torch.cat(new_rows)
    # Work in the pool's own layout: keys [heads, n, dim] of a head-major pool, [n, heads, dim] otherwise,
    # gathered and written back with index_select / index_copy_ (advanced indexing is several times slower
    # on the CPU).
    slot_dim = 1 if pool.head_major else 0
    for start in range(0, len(positions), _CHUNK):
        part = slice(start, start + _CHUNK)
        cos_delta, sin_delta = _delta_rotation(positions[part], old_freq[part], new_freq[part])
        if not pool.head_major:  # broadcast over the heads between slots and channels
            cos_delta, sin_delta = cos_delta[:, None], sin_delta[:, None]
        part_slots = slots[part]
        for layer in range(pool.num_layers):
            cache = pool.keys(layer) if pool.head_major else pool.flat_keys(layer)
            keys = cache.index_select(slot_dim, part_slots)
            cache.index_copy_(slot_dim, part_slots, _rotate(keys, cos_delta, sin_delta).to(cache.dtype))


def _delta_rotation(
    positions: torch.Tensor, old_freq: torch.Tensor, new_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation from old to new angles; the frequencies are one row for all positions or one per position."""
    old_angles = positions.float()[:, None] * old_freq
    new_angles = positions.float()[:, None] * new_freq
    old_cos, old_sin = old_angles.cos(), old_angles.sin()
    new_cos, new_sin = new_angles.cos(), new_angles.sin()
    # angle(new) - angle(old) through the addition formulas, from exactly the tables a fresh pass uses
    cos_delta = new_cos * old_cos + new_sin * old_sin
    sin_delta = new_sin * old_cos - new_cos * old_sin
    return torch.cat((cos_delta, cos_delta), -1), torch.cat((sin_delta, sin_delta), -1)


def _rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``keys``; ``cos``/``sin`` broadcast against them."""
    rotary_dim = cos.shape[-1]
    keys = keys.float()
    rotated = keys[..., :rotary_dim]
    rotated = rotated * cos + rotate_half(rotated) * sin
    if rotary_dim == keys.shape[-1]:
        return rotated
    return torch.cat((rotated, keys[..., rotary_dim:]), dim=-1)
