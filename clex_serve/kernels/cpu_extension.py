"""clex-serve's C++ CPU kernels (``csrc/``), compiled on first use and cached, as DeepSpeed's ops are.

The kernels register as ``torch.ops.clex_cpu.*``. They are built with the machine's C++ compiler through
``torch.utils.cpp_extension`` (about 10 s once; the cache lives under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and compiled for AVX-512, which they check for at run time. Where any of this
is missing (no compiler, another architecture, an older CPU), or ``CLEX_SERVE_CPU_KERNELS=0`` is set, the
CPU path stays on PyTorch's own operators, a warning says why, and results do not change.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("blocked_linear.cpp", "fused_ops.cpp", "decode_attention.cpp", "decoder_layer.cpp",
                                    "penalties.cpp", "sampling.cpp")]
DISABLE_VARIABLE = "CLEX_SERVE_CPU_KERNELS"
NAME = "clex_serve_cpu_kernels"


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
    if not torch.ops.clex_cpu.cpu_supported():
        logger.info("this CPU has no AVX-512: using PyTorch's operators for linear layers")
        return False
    return True


def _build() -> None:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    build_directory = Path(cpp_extension._get_build_directory(NAME, False))
    if not (build_directory / f"{NAME}.so").exists():
        # The first start after installing: say why it pauses (later starts load the cached library).
        logger.warning("compiling clex-serve's CPU kernels once (about 10-30 s; cached in %s)", build_directory)
    cpp_extension.load(
        name=NAME,
        sources=[str(source) for source in SOURCES],
        # OpenMP: at::parallel_for runs on torch's own thread pool (the libgomp torch loaded), so the
        # kernels use the threads --threads set. No contraction into FMAs: the fused element-wise kernels
        # round like PyTorch's separate operators.
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", f"-DCLEX_CPU_HEADERS={_headers_digest()}"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _headers_digest() -> str:
    """A digest of the headers, passed as a define: torch rebuilds a cached extension when its sources or
    flags change, and does not look at the headers they include."""
    digest = hashlib.sha256()
    for header in sorted(CSRC.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:16]


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
