"""CLEX's training-time sampling of the length scale ``t`` and of fractional positions.

Every step draws an integer ``t`` uniformly from ``1..max_factor``. A training sequence of ``N`` tokens
(``s = N // L0`` base windows, at least 1) is then rotated at ``0``, then ``(q + 1) / s`` for ``N - 2`` values
``q`` drawn without replacement from ``0..N*t - 3`` and sorted, then ``N*t // s - 1``: the ``N`` tokens are
spread over the ``N*t / s`` positions of a window ``t`` times longer, so the model meets the distances of
long contexts while paying for short ones. At ``t == 1`` and ``s == 1`` this is exactly ``0..N-1``.
"""

from __future__ import annotations

import torch


def draw_scale(max_factor: int, generator: torch.Generator) -> int:
    if max_factor < 1:
        raise ValueError(f"max_factor must be >= 1, got {max_factor}")
    return int(torch.randint(1, max_factor + 1, (1,), generator=generator).item())


def fractional_positions(seq_len: int, base_len: int, scale: int, generator: torch.Generator) -> torch.Tensor:
    """float32 positions [seq_len] for ``seq_len`` training tokens at scale ``scale`` (see module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    stride = max(seq_len // base_len, 1)  # s
    span = seq_len * scale
    inner = torch.randperm(span - 2, generator=generator)[: seq_len - 2].sort().values
    positions = torch.empty(seq_len, dtype=torch.float32)
    positions[0] = 0.0
    positions[1:-1] = (inner + 1).float() / stride
    positions[-1] = float(span // stride - 1)
    return positions
