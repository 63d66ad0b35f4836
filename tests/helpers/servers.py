"""Server processes on 127.0.0.1 for the server tests and the serving benchmark, started and stopped with
bounded waits."""

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
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
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
        stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it has not exited within 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def healthy_process(command: list[str], url: str, timeout: float = 300.0, env: dict | None = None):
    """Any OpenAI-style server (``command``) once ``url``/health answers 200; stopped on the way out. For
    servers that announce nothing on their output (the benchmarks' baselines)."""
    import httpx

    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} did not become healthy in {timeout:.0f} s")
            time.sleep(0.5)
        yield process
    finally:
        stop_process(process)
