"""``each_cpu_isa``: a CPU kernel test runs once per instruction set the kernels have a body for and this CPU
runs (AVX-512 and AVX2 on an AVX-512 machine, AVX2 alone elsewhere), so that both bodies are tested where
the suite runs on AVX-512."""

import pytest

from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available


@pytest.fixture(params=["avx512", "avx2"])
def each_cpu_isa(request):
    if not cpu_kernels_available():
        pytest.skip("CPU kernels do not build here")
    previous = cpu_ops.cpu_isa()
    if cpu_ops.select_cpu_isa(request.param) != request.param:
        cpu_ops.select_cpu_isa(previous)
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    cpu_ops.select_cpu_isa(previous)
