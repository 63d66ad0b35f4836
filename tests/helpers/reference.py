"""The golden CLEX checkpoints (tests/fixtures/clex_reference) and a driver for one sequence on a runner."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep

FIXTURES = Path(__file__).parents[1] / "fixtures" / "clex_reference"
# Tests that need a CUDA device: skipped without one (conftest.py), and deselected with -m "not cuda".
requires_cuda = pytest.mark.cuda
# Parity tests run on every device this machine has; float32 on each, with the same bounds.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
REFERENCE_MODELS = sorted(MANIFEST["models"])


def reference_cases(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "cases.safetensors"))


def reference_prompt(name: str, length: int) -> dict[str, list[int]]:
    """The first ``length`` tokens of reference model ``name``'s golden sequence, as a token-id prompt."""
    return {"prompt_token_ids": reference_cases(name)["sequence"][:length].tolist()}


class SingleSequence:
    """Drives the model runner for one sequence, with a deliberately scattered block table, or with its blocks
    one run of consecutive ones (``one_run``: what the block manager aims for, and what the CPU's prompt
    attention kernel reads in one call)."""

    def __init__(self, runner: ModelRunner, max_len: int, one_run: bool = False) -> None:
        self.runner = runner
        blocks_needed = -(-max_len // runner.block_size)
        # Non-contiguous, descending blocks: positions must go through the block table to be found.
        num_blocks = runner.kv_cache.num_blocks
        scattered = list(range(num_blocks - 1, -1, -2)) + list(range(num_blocks - 2, -1, -2))
        self.block_table = list(range(1, num_blocks)) if one_run else scattered
        self.block_table = self.block_table[:blocks_needed]
        assert len(self.block_table) == blocks_needed, "test pool too small"
        self.num_cached = 0
        self.scale = 1

    def feed(self, token_ids: list[int], all_logits: bool = False):
        scale = self.runner.rope.scale_for_length(self.num_cached + len(token_ids))
        step = SequenceStep(token_ids, self.num_cached, self.block_table, self.scale, all_logits, scale=scale)
        result = self.runner.execute([step])
        self.num_cached += len(token_ids)
        self.scale = scale
        return result
