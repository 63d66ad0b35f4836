"""Choose the attention backend: flash-attn on CUDA when installed, SDPA otherwise."""

from __future__ import annotations

import importlib.util

import torch

from clex_serve.attention.flash import FLASH_BLOCK_SIZE, FlashAttentionBackend
from clex_serve.attention.sdpa import SdpaAttentionBackend

BACKENDS = ("auto", "sdpa", "flash-attn")


def flash_attn_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def get_attention_backend(name: str, device: torch.device, sliding_window: int | None, dtype: torch.dtype):
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(BACKENDS)}")
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "flash-attn" and not flash_attn_available(device):
        raise ValueError("--attention-backend flash-attn needs a CUDA device and `pip install clex-serve[cuda]`")
    if name == "flash-attn" and not half:
        raise ValueError("--attention-backend flash-attn runs float16/bfloat16 only; pass --dtype bfloat16")
    if name == "flash-attn" or (name == "auto" and half and flash_attn_available(device)):
        return FlashAttentionBackend(sliding_window)
    return SdpaAttentionBackend(sliding_window)


def default_block_size(backend) -> int:
    return FLASH_BLOCK_SIZE if isinstance(backend, FlashAttentionBackend) else 16
