"""When the fused Triton kernels replace their PyTorch equivalents: on CUDA tensors, with triton installed."""

from __future__ import annotations

import importlib.util

import torch

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def use_triton_kernels(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and TRITON_INSTALLED
