"""A model's layers swapped for its device's implementations, once, where the model runner is built.

The model files build PyTorch modules and ask nothing about the device. Here, in one place:

- on the CPU, every float32/bfloat16 linear layer becomes a ``CpuLinear`` (blocked and oneDNN layouts); where
  the C++ kernels build for the dtype, RMSNorm and the gated silu become their C++ calls, and, under the
  attention backend that reads the cache in place with the kernels, each Llama-family decoder layer that
  fits becomes a ``CpuLlamaDecoderLayer`` (a decode step in one call per layer);
- on CUDA with triton installed, RMSNorm and the gated silu become their Triton kernels.

A second runner over the same model finds the layers swapped already and changes nothing.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from clex_serve.attention.backend import AttentionBackend
from clex_serve.attention.cpu import CpuAttentionBackend
from clex_serve.kernels.cpu_extension import cpu_kernels_for
from clex_serve.layers.activation import ActAndMul
from clex_serve.layers.norm import RMSNorm
from clex_serve.layers.replace import replace_modules

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def use_device_layers(model: nn.Module, device: torch.device, dtype: torch.dtype, backend: AttentionBackend) -> None:
    """Swap ``model``'s layers (on ``device`` in ``dtype``) for the device's implementations, in place."""
    if device.type == "cpu":
        use_cpu_layers(model, cpu_kernels_for(device, dtype), backend)
    elif device.type == "cuda" and TRITON_INSTALLED:
        use_triton_layers(model)


def use_cpu_layers(model: nn.Module, kernels: bool, backend: AttentionBackend) -> None:
    """The CPU's layers; ``kernels``: the C++ kernels serve the model's dtype here."""
    from clex_serve.kernels.cpu_decode_layer import CpuLlamaDecoderLayer
    from clex_serve.kernels.cpu_layers import CpuRMSNorm, CpuSiluAndMul
    from clex_serve.kernels.cpu_linear import replace_cpu_linear_layers

    # A tied input embedding keeps its plain weight, which the linear layer of the head shares.
    tied = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    replace_cpu_linear_layers(model, shared=tied, blocked=kernels)
    if not kernels:
        return
    _use_fused_layers(model, CpuRMSNorm, CpuSiluAndMul)
    if isinstance(backend, CpuAttentionBackend) and backend.kernels:
        replace_modules(model, CpuLlamaDecoderLayer.replacing)


def use_triton_layers(model: nn.Module) -> None:
    """The Triton kernels' RMSNorm and gated silu (CUDA; on the CPU, tests run them in Triton's interpreter)."""
    from clex_serve.kernels.triton_layers import TritonRMSNorm, TritonSiluAndMul

    _use_fused_layers(model, TritonRMSNorm, TritonSiluAndMul)


def _use_fused_layers(model: nn.Module, norm: type[RMSNorm], silu_and_mul: type[ActAndMul]) -> None:
    """Each RMSNorm and gated silu of ``model`` (plain, or another device's) replaced by the given kernel
    modules."""

    def replacement(module: nn.Module) -> nn.Module | None:
        if isinstance(module, RMSNorm) and type(module) is not norm:
            return norm.replacing(module)
        if isinstance(module, ActAndMul) and module.is_silu and type(module) is not silu_and_mul:
            return silu_and_mul()
        return None

    replace_modules(model, replacement)
