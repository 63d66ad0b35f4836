"""The machine's own yardsticks for the CPU benchmark, from the C++ kernels of ``csrc/yardsticks.cpp``.

- read bandwidth: every thread streams its own share of a buffer with 64-byte loads, as a decode streams its
  weights; measured at the size a decode re-reads each token (what stays in the last-level cache is read
  from there, as the decode reads it) and at 1 GiB (memory alone), in the 2 MB pages the engine puts its
  weights and KV cache in (``kernels/huge_pages.py``; in 4 KB pages the same stream read 88 MB at 23-32
  GB/s against 44-49, and 1 GiB at a median 30.0 against 33.9, below what the engine's weights stream at);
- compute peaks: float32 FMAs and bfloat16 dot products (``vdpbf16ps``) on registers, every thread, and
  where the CPU has AMX, bfloat16 tile multiplies (``tdpbf16ps``), which oneDNN's bfloat16 GEMMs run on.

Each is the highest of several runs: a neighbour's load on a shared machine lowers a run, never raises one,
so the highest is the conservative yardstick (it lowers every fraction).
"""

from __future__ import annotations

import time

import torch

from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available
from clex_serve.kernels.huge_pages import HugePageArena, huge_pages_supported

MEMORY_BYTES = 1 << 30
PEAK_ITERATIONS = 1_000_000  # x 24 instructions per thread: a few milliseconds
# FLOPs a lane of one instruction: a multiply-add, two of them (vdpbf16ps, 16 lanes: AVX-512 only).
FLOPS_PER_LANE = {"float32": 2, "bfloat16": 4}


def available() -> bool:
    return cpu_kernels_available()


def best_time(function, runs: int) -> float:
    function()  # warm: pages touched, threads up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def read_bandwidth(nbytes: int = MEMORY_BYTES, runs: int = 7) -> float:
    """Bytes/s every thread together reads a buffer of ``nbytes`` at (highest of ``runs``)."""
    data = HugePageArena().empty((max(nbytes // 4, 1 << 16),), torch.float32).fill_(1.0)
    return data.nbytes / best_time(lambda: cpu_ops.stream_read(data), runs)


AMX_ITERATIONS = 100_000  # x 4 tile multiplies per thread
AMX_FLOPS = 16 * 16 * 32 * 2


def compute_peak(dtype: str, runs: int = 7) -> float | None:
    """FLOP/s of every thread's independent FMA (float32) or ``vdpbf16ps`` (bfloat16) chains; None where the
    CPU has no AVX512_BF16."""
    if dtype == "bfloat16" and not cpu_ops.bf16_dot_supported():
        return None
    kernel = cpu_ops.fma_peak if dtype == "float32" else cpu_ops.bf16_dot_peak
    seconds = best_time(lambda: kernel(PEAK_ITERATIONS), runs)
    instructions = torch.get_num_threads() * PEAK_ITERATIONS * 24
    lanes = cpu_ops.vector_lanes() if dtype == "float32" else 16
    return instructions * lanes * FLOPS_PER_LANE[dtype] / seconds


def amx_peak(runs: int = 7) -> float | None:
    """FLOP/s of every thread's four chains of AMX bfloat16 tile multiplies; None without AMX."""
    if not cpu_ops.amx_bf16_supported():
        return None
    seconds = best_time(lambda: cpu_ops.amx_bf16_peak(AMX_ITERATIONS), runs)
    return torch.get_num_threads() * AMX_ITERATIONS * 4 * AMX_FLOPS / seconds


class Yardsticks:
    """Measured once at the start of the benchmark (a read at another size: ``read_bandwidth``)."""

    def __init__(self) -> None:
        self.memory = self.float32 = 0.0
        self.bf16_dot = self.amx = None
        self.remeasure()

    def remeasure(self) -> None:
        """Measure again, keeping the highest of every figure: a neighbour's job on a shared machine can
        hold a core for minutes, which the runs of one measurement do not outlast. Each table measures at
        its start, and ``print`` shows what its fractions were taken against."""
        self.memory = max(self.memory, read_bandwidth())
        self.float32 = max(self.float32, compute_peak("float32"))
        bf16_dot, amx = compute_peak("bfloat16"), amx_peak()
        self.bf16_dot = max(self.bf16_dot or 0.0, bf16_dot) if bf16_dot else None
        self.amx = max(self.amx or 0.0, amx) if amx else None

    def peak(self, dtype: str) -> float:
        """The compute peak a dtype's GEMMs run against: float32 FMAs; bfloat16 AMX tiles where present
        (oneDNN uses them), else ``vdpbf16ps``, else float32 FMAs (bfloat16 widened)."""
        if dtype == "float32":
            return self.float32
        return self.amx or self.bf16_dot or self.float32

    def print(self) -> None:
        def flops(value: float | None) -> str:
            return f"{value / 1e9:.0f} GFLOP/s" if value else "not on this CPU"

        print("| yardstick (highest of 7 runs) | measured | kernel (csrc/yardsticks.cpp) |\n| --- | --- | --- |")
        loads = f"{cpu_ops.vector_lanes() * 4}-byte loads, {'2 MB' if huge_pages_supported() else '4 KB'} pages"
        print(f"| read bandwidth, 1 GiB | {self.memory / 1e9:.1f} GB/s | every thread sums its share, {loads} |")
        chains = "24 vfmadd231ps chains" if cpu_ops.cpu_isa() == "avx512" else "12 vfmadd231ps chains (AVX2)"
        print(f"| float32 peak | {flops(self.float32)} | {chains} per thread |")
        print(f"| bfloat16 dot-product peak | {flops(self.bf16_dot)} | 24 vdpbf16ps chains per thread |")
        print(f"| bfloat16 AMX peak | {flops(self.amx)} | 4 tdpbf16ps tile chains per thread |")
