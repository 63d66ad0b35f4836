"""Kernels that fuse the small steps of a decode step, and the modules that run them: Triton on CUDA, C++ on
the CPU.

A decode step of a 7B model reads 13 GB of weights in a few milliseconds; each further kernel launch costs
microseconds even inside a CUDA graph. Unfused, the norms, rotary and cache writes are about 25 small
kernels per layer. Each kernel here replaces several of them and computes what its PyTorch equivalent
computes, with the same roundings to the model's dtype. On the CPU, where each operator costs microseconds
of dispatch, ``csrc/`` holds C++ equivalents (compiled on first use, ``cpu_extension``; called through
``cpu_ops`` alone).

The model files know none of this: where the model runner is built, ``device_layers`` swaps the layers for
their device's implementation once (``cpu_linear``, ``cpu_layers``, ``cpu_decode_layer``, ``triton_layers``),
as gpt-fast's quantization swaps its linears; wherever neither applies the PyTorch modules stay.
"""
