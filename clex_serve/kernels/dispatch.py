"""Which fused kernels replace their PyTorch equivalents: Triton on CUDA tensors (with triton installed),
the C++ CPU kernels on CPU tensors of float32 or bfloat16 (where they build)."""

from __future__ import annotations

import importlib.util

import torch

from clex_serve.kernels.cpu_extension import cpu_kernels_available

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def use_triton_kernels(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and TRITON_INSTALLED


def use_cpu_kernels(tensor: torch.Tensor) -> bool:
    return (tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.bfloat16)
            and cpu_kernels_available())
