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
# freed in turn, from the engine's own thread; prints the page faults of the repeats after the first.
PROGRAM = """
import resource, sys, threading, torch
from clex_serve.engine.worker.host_memory import keep_freed_host_memory
print("applied", keep_freed_host_memory())
faults = []
def steps():
    for _ in range(4):
        torch.ones(20_000_000).sum()  # the first ones: the heap grows until freed blocks coalesce
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(20_000_000).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=steps)
thread.start()
thread.join()
print("faults", faults[0])
"""


def run(keep: str) -> tuple[bool, int]:
    env = {**os.environ, "CLEX_SERVE_KEEP_HOST_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    return lines["applied"] == "True", int(lines["faults"])


def test_large_activations_are_reused_without_page_faults():
    applied, faults = run("1")
    assert applied
    # 10 x 80 MB is 195,000 pages of 4 KB when each tensor is mapped afresh. Kept, they are none once the
    # heap has settled (it can still grow by a tensor or two: an aligned block asks a little more than the
    # one freed before it).
    assert faults < 45_000, faults


def test_the_setting_can_be_turned_off_and_then_each_tensor_faults_again():
    applied, faults = run("0")
    assert not applied
    assert faults > 150_000, faults
