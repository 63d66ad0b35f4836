"""Kernels that fuse the small element-wise steps of a decode step: Triton on CUDA, C++ on the CPU.

A decode step of a 7B model reads 13 GB of weights in a few milliseconds; each further kernel launch costs
microseconds even inside a CUDA graph. Unfused, the norms, rotary and cache writes are about 25 small
kernels per layer. Each kernel here replaces several of them and computes what its PyTorch equivalent
computes, with the same roundings to the model's dtype. On the CPU, where each operator costs microseconds
of dispatch, ``csrc/`` holds C++ equivalents (compiled on first use, ``cpu_extension``); the PyTorch code
stays the path wherever neither applies.
"""

from clex_serve.kernels.dispatch import use_cpu_kernels, use_triton_kernels

__all__ = ["use_cpu_kernels", "use_triton_kernels"]
