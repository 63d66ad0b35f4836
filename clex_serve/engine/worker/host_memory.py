"""Host memory that a CPU engine frees is kept for its next step, not handed back to the kernel.

A prompt's activations are tens of MB each (a 7,000-token float32 prompt's gate/up projection is 79 MB)
and live for one layer. glibc's malloc serves every allocation above its mmap threshold (at most 32 MB)
with a fresh ``mmap`` and unmaps it on free, so each such tensor was faulted in again page by page, every
layer of every prompt: 330,000-390,000 page faults in a 7,000-token float32 prefill, at about 1.3 us each
here. Served from the heap instead, and the heap not trimmed, they are reused from the second prompt on
with no faults at all (docs/cpu.md has the times; the peak resident memory was 2.05 GB before, 1.98
after). This is the CPU counterpart of CUDA's caching allocator, and what the tcmalloc or jemalloc that
vLLM's and IPEX's CPU guides preload buy, without a preload.

The cost is that memory freed by the process stays with it (up to ``TRIM_THRESHOLD`` at the heap's top)
for its next use: what a serving process wants, and what ``CLEX_SERVE_KEEP_HOST_MEMORY=0`` turns off for
a process that shares the machine. Only glibc has these settings; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # the largest mallopt takes: freed memory past 2 GiB at the heap's top is returned

_applied: bool | None = None


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to keep what is freed (once per process); whether it now does."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("CLEX_SERVE_KEEP_HOST_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Large blocks from the heap rather than mmap; the heap not trimmed; and one arena, so that the engine's
    # thread allocates from the main heap (a thread's own arena grows in 64 MB heaps and maps anything
    # larger afresh). Set before the engine's thread first allocates.
    _applied = all(
        libc.mallopt(parameter, value) == 1
        for parameter, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1))
    )
    if not _applied:
        logger.warning("glibc refused a malloc setting: prompt activations will be page-faulted in afresh")
    return _applied
