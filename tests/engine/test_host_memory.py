"""A CPU engine's freed activations are reused, not faulted in afresh (``engine/worker/host_memory.py``).

Each case runs in a fresh interpreter: the malloc settings are process-wide and cannot be undone.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings"
)

# A prompt's activation lifetime in small: 80 MB tensors (past glibc's largest mmap threshold) made and
# freed in turn, from the engine's own thread; prints the page faults of each repeat once the heap settled.
PROGRAM = """
import resource, sys, threading, torch
from clex_serve.engine.worker.host_memory import keep_freed_host_memory
print("applied", keep_freed_host_memory())
faults = []
def steps():
    for _ in range(4):
        torch.ones(20_000_000).sum()  # the first ones: the heap grows until freed blocks coalesce
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(20_000_000).sum()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=steps)
thread.start()
thread.join()
print("faults", sorted(faults)[len(faults) // 2])
"""

TENSOR_PAGES = 80_000_000 // 4096  # 19,531 pages of 4 KB in one tensor mapped afresh


def run(keep: str) -> tuple[bool, int]:
    """Whether the settings applied, and the median page faults of one repeat."""
    env = {**os.environ, "CLEX_SERVE_KEEP_HOST_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    return lines["applied"] == "True", int(lines["faults"])


def test_large_activations_are_reused_without_page_faults():
    applied, faults = run("1")
    assert applied
    # Kept, a repeat faults nothing once the heap has settled. The median, because the heap can still grow
    # by a tensor now and then (one machine faulted three tensors' worth in ten repeats): a small block put
    # past a freed tensor leaves a hole that the next, aligned, tensor may not fit, so it goes to fresh pages.
    assert faults < TENSOR_PAGES // 10, faults


def test_the_setting_can_be_turned_off_and_then_each_tensor_faults_again():
    applied, faults = run("0")
    assert not applied
    assert faults > TENSOR_PAGES * 9 // 10, faults
