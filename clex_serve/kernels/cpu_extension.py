"""clex-serve's C++ CPU kernels (``csrc/``), compiled on first use and cached, as DeepSpeed's ops are.

The kernels register as ``torch.ops.clex_cpu.*``, which ``cpu_ops`` alone calls. They are built with the
machine's C++ compiler through ``torch.utils.cpp_extension`` (10 s to over a minute, once; the cache lives
under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). Each kernel has an AVX-512 body and an
AVX2 + FMA one, chosen at run time: AVX-512 where the CPU has it, AVX2 elsewhere, or AVX2 everywhere with
``CLEX_SERVE_CPU_ISA=avx2``. Where any of this is missing (no compiler, another architecture, a CPU without
AVX2), or ``CLEX_SERVE_CPU_KERNELS=0`` is set, the CPU path stays on PyTorch's own operators, a warning says
why, and results do not change.

Each build has a library of its own, named by a digest of what it is built from: the sources and headers,
the flags, torch's version and the Python installation (``sys.prefix``). Two virtual environments, or two
versions of clex-serve, never rebuild each other's library: each finds its own in the cache and loads it
without invoking the compiler, and a build runs (with a notice, since it pauses the start) only when that
library is not there yet.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from clex_serve.kernels import cpu_ops

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# One file per op family; torch_bindings.cpp registers every schema, clex_cpu.h declares every op.
SOURCES = [
    CSRC / name
    for name in (
        "torch_bindings.cpp",
        "cpu_features.cpp",
        "blocked_linear.cpp",
        "bf16_pair_linear.cpp",
        "amx_pair_linear.cpp",
        "amx_gemm.cpp",
        "rms_norm.cpp",
        "activation.cpp",
        "rotary_cache.cpp",
        "decode_attention.cpp",
        "prefill_attention.cpp",
        "decoder_layer.cpp",
        "decode_step.cpp",
        "decode_run.cpp",
        "sampling.cpp",
        "penalties.cpp",
        "yardsticks.cpp",
    )
]
DISABLE_VARIABLE = "CLEX_SERVE_CPU_KERNELS"
ISA_VARIABLE = "CLEX_SERVE_CPU_ISA"  # "avx2": the AVX2 bodies on an AVX-512 CPU too
NAME_PREFIX = "clex_serve_cpu_kernels"
# OpenMP: at::parallel_for runs on torch's own thread pool (the libgomp torch loaded), so the kernels use the
# threads --threads set. No contraction into FMAs: the fused element-wise kernels round like PyTorch's
# separate operators.
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]


@functools.cache
def cpu_kernels_available() -> bool:
    """Build (or load from the cache) and register the CPU kernels; False where they cannot run here."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        _build()
    except Exception as error:  # no compiler, no ninja, headers missing: fall back, but say so once
        lines = str(error).strip().splitlines()
        # The compiler's first "error:" line says most; ninja's last line only that the build stopped.
        reason = next((line.strip() for line in lines if "error:" in line), lines[-1] if lines else repr(error))
        logger.warning("CPU kernels could not be built (%s); using PyTorch's operators instead", reason)
        return False
    if not cpu_ops.cpu_supported():
        logger.info("this CPU has no AVX2 and FMA: using PyTorch's operators")
        return False
    isa = os.environ.get(ISA_VARIABLE, "avx512").lower()
    if isa not in ("avx512", "avx2"):
        logger.warning("%s=%s is not 'avx512' or 'avx2': taking the best this CPU has", ISA_VARIABLE, isa)
        isa = "avx512"
    logger.info("CPU kernels on %s", cpu_ops.select_cpu_isa(isa))
    return True


def cpu_kernels_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels serve tensors of ``dtype`` on ``device`` here: asked once, where a model, its
    attention backend or the sampler is built, never per call."""
    return device.type == "cpu" and dtype in cpu_ops.KERNEL_DTYPES and cpu_kernels_available()


def extension_name() -> str:
    """The library's name for this build: a digest of everything that makes it differ (torch rebuilds a
    cached extension when its sources' paths, mtimes or flags change, but does not look at the headers, and
    one shared name would make every installation overwrite the others' library)."""
    digest = hashlib.sha256()
    for part in (torch.__version__, torch.version.git_version, sys.prefix, sys.version, *CFLAGS, *LDFLAGS):
        digest.update(str(part).encode() + b"\0")
    for file in sorted(SOURCES) + sorted(CSRC.glob("*.h")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return f"{NAME_PREFIX}_{digest.hexdigest()[:16]}"


def _build() -> None:
    from torch.utils import cpp_extension

    name = extension_name()
    build_directory = Path(cpp_extension._get_build_directory(name, False))
    library = build_directory / f"{name}.so"
    # torch's "lock" file is there while a build runs (another process may be building this very library).
    if library.is_file() and not (build_directory / "lock").exists():
        torch.ops.load_library(str(library))  # built before from exactly these sources: no compiler needed
        return
    logger.warning(
        "compiling clex-serve's CPU kernels for this installation (once: 10 s to over a minute; cached in %s)",
        build_directory,
    )
    _clear_stale_lock(build_directory / "lock")
    _put_ninja_on_path()
    cpp_extension.load(
        name=name,
        sources=[str(source) for source in SOURCES],
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        build_directory=str(build_directory),
        is_python_module=False,
        verbose=False,
    )


# A build that takes longer than this is not running any more: its process died holding torch's lock.
STALE_LOCK_SECONDS = 20 * 60


def _clear_stale_lock(lock: Path) -> None:
    """torch waits without end on the lock file of a build; a build killed midway (a timeout, Ctrl-C)
    leaves the file behind, and every later start would wait on it for ever. A lock older than any build
    takes is removed; a younger one is waited on, as torch would, up to that age."""
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return  # the other build finished meanwhile
        if age > STALE_LOCK_SECONDS:
            logger.warning("removing the lock of a kernel build that died %.0f minutes ago: %s", age / 60, lock)
            lock.unlink(missing_ok=True)
            return
        time.sleep(1.0)


def _put_ninja_on_path() -> None:
    """torch builds extensions with ninja; the ``ninja`` wheel's binary is not on PATH when the virtual
    environment is used without being activated."""
    try:
        import ninja
    except ImportError:
        return
    directory = str(ninja.BIN_DIR)
    if directory not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
