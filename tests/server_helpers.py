"""A real ``clex-serve`` process on 127.0.0.1 for the server tests, started and stopped with bounded waits."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(*args: str, env: dict | None = None, startup_timeout: float = 120.0):
    """Yields (base URL, process). The process is stopped (SIGTERM, then SIGKILL) on the way out."""
    port = free_port()
    command = [sys.executable, "-m", "clex_serve.cli.main", "--port", str(port), "--device", "cpu", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    deadline = time.monotonic() + startup_timeout
    line = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "serving" in line or process.poll() is not None:
            break
    if "serving" not in line:
        process.kill()
        raise RuntimeError(f"clex-serve did not start: {line!r} {process.stderr.read()[-2000:]}")
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
