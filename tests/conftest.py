import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clex_serve.engine.loader import load_model
from clex_serve.engine.model_runner import ModelRunner, SequenceStep

FIXTURES = Path(__file__).parent / "fixtures" / "clex_reference"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
REFERENCE_MODELS = sorted(MANIFEST["models"])


def reference_cases(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "cases.safetensors"))


class SingleSequence:
    """Drives the model runner for one sequence, with a deliberately scattered block table."""

    def __init__(self, runner: ModelRunner, max_len: int) -> None:
        self.runner = runner
        blocks_needed = -(-max_len // runner.block_size)
        # Non-contiguous, descending blocks: positions must go through the block table to be found.
        num_blocks = runner.kv_cache.num_blocks
        scattered = list(range(num_blocks - 1, -1, -2)) + list(range(num_blocks - 2, -1, -2))
        self.block_table = scattered[:blocks_needed]
        assert len(self.block_table) == blocks_needed, "test pool too small"
        self.num_cached = 0
        self.scale = 1

    def feed(self, token_ids: list[int], all_logits: bool = False):
        step = SequenceStep(token_ids, self.num_cached, self.block_table, self.scale, all_logits)
        result = self.runner.execute([step])
        self.num_cached += len(token_ids)
        self.scale = result.scales[0]
        return result


@pytest.fixture(scope="session")
def reference_runner():
    """name -> a float32 CPU runner over that reference checkpoint (loaded once per session)."""
    runners = {}

    def get(name: str, block_size: int = 4) -> ModelRunner:
        if (name, block_size) not in runners:
            loaded = load_model(FIXTURES / name, dtype="float32", device="cpu", show_progress=False)
            runners[name, block_size] = ModelRunner(loaded, num_blocks=96, block_size=block_size)
        return runners[name, block_size]

    return get
