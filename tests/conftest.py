"""Shared fixtures, and the markers' effects: ``cuda`` tests skip where there is no CUDA device."""

import os

import openai
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter here; must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from clex_serve.engine.worker.model_runner import ModelRunner  # noqa: E402
from clex_serve.loading.loader import load_model  # noqa: E402
from helpers.reference import FIXTURES  # noqa: E402


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def reference_runner():
    """name -> a runner over that reference checkpoint (float32 on the CPU unless asked; loaded once per
    session). On CUDA its decode steps replay CUDA graphs."""
    runners = {}

    def get(name: str, block_size: int = 4, device: str = "cpu", dtype: str = "float32") -> ModelRunner:
        key = (name, block_size, device, dtype)
        if key not in runners:
            loaded = load_model(FIXTURES / name, dtype=dtype, device=device, show_progress=False)
            runners[key] = ModelRunner(loaded, num_blocks=96, block_size=block_size, max_num_seqs=8)
        return runners[key]

    return get


@pytest.fixture(scope="module")
def client(server):
    """The official OpenAI client on the ``server`` fixture of the module that asks (its URL)."""
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
