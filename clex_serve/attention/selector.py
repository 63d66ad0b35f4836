"""Choose the attention backend, once per model: flash-attn on CUDA when installed, else a Triton paged decode
on CUDA; on the CPU the backend that reads the cache in place (with the C++ kernels where they build for the
dtype), or SDPA with a sliding window."""

from __future__ import annotations

import importlib.util
import os

import torch

from clex_serve.attention import segments
from clex_serve.attention.backend import AttentionBackend
from clex_serve.attention.cpu import CpuAttentionBackend, cpu_rotate_and_write
from clex_serve.attention.flash import FLASH_BLOCK_SIZE, FlashAttentionBackend
from clex_serve.attention.sdpa import SdpaAttentionBackend
from clex_serve.kernels.cpu_extension import cpu_kernels_for

BACKENDS = ("auto", "sdpa", "triton", "flash-attn")


def flash_attn_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def triton_available(device: torch.device) -> bool:
    """Triton compiles for CUDA; on the CPU only its interpreter runs it (``TRITON_INTERPRET=1``, for tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def get_attention_backend(
    name: str, device: torch.device, sliding_window: int | None, dtype: torch.dtype
) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(BACKENDS)}")
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "flash-attn" and not flash_attn_available(device):
        raise ValueError("--attention-backend flash-attn needs a CUDA device and `pip install clex-serve[cuda]`")
    if name == "flash-attn" and not half:
        raise ValueError("--attention-backend flash-attn runs float16/bfloat16 only; pass --dtype bfloat16")
    if name == "triton" and not triton_available(device):
        raise ValueError("--attention-backend triton needs a CUDA device and the triton package")
    if name == "flash-attn" or (name == "auto" and half and flash_attn_available(device)):
        return FlashAttentionBackend(sliding_window)
    if name == "triton" or (name == "auto" and device.type == "cuda" and triton_available(device)):
        from clex_serve.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(sliding_window, _num_multiprocessors(device))
    if device.type == "cpu":
        kernels = cpu_kernels_for(device, dtype)
        if sliding_window is None and segments.segmented_attention_available():
            return CpuAttentionBackend(kernels)
        if kernels:
            return SdpaAttentionBackend(sliding_window, cpu_rotate_and_write)
    return SdpaAttentionBackend(sliding_window)


def _num_multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the context splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_block_size(backend) -> int:
    return FLASH_BLOCK_SIZE if isinstance(backend, FlashAttentionBackend) else 16
