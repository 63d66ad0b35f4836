"""The CPU's whole decode step (``CpuDecodeStep``) equals the path through the model's modules bit for bit (the
golden CLEX checkpoints, float32 and bfloat16, across scale changes and with the log scale), on block tables
scanned for runs and on the runs the block manager keeps; decode steps use it, and only where it applies."""

import pytest
import torch

from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep
from clex_serve.kernels.cpu_decode_step import CpuDecodeStep
from clex_serve.kernels.cpu_extension import cpu_kernels_available
from clex_serve.loading.loader import load_model
from helpers.models import FIXTURES, batched_decode_logits

pytestmark = [
    pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here"),
    pytest.mark.usefixtures("each_cpu_isa"),
]

PROMPT_LENS = [5, 14, 31]  # three sequences, whose lengths cross CLEX scales while decoding


def runner_for(name: str, dtype: str) -> ModelRunner:
    loaded = load_model(FIXTURES / name, dtype=dtype, device="cpu", show_progress=False)
    return ModelRunner(loaded, num_blocks=96, block_size=4, max_num_seqs=8)


def counting_steps(monkeypatch) -> list[int]:
    """Record the batch size of every step the fast path computes."""
    used = []
    logits = CpuDecodeStep.logits

    def counting(self, steps, scales, runner):
        used.append(len(steps))
        return logits(self, steps, scales, runner)

    monkeypatch.setattr(CpuDecodeStep, "logits", counting)
    return used


def contiguous_decode_logits(runner: ModelRunner, tokens: list[int], steps: int) -> torch.Tensor:
    """As ``batched_decode_logits``, with each sequence in consecutive blocks given as the block manager's
    runs (``SequenceStep.block_runs``)."""
    span = 96 // len(PROMPT_LENS)
    tables = [list(range(i * span, (i + 1) * span)) for i in range(len(PROMPT_LENS))]
    runs = [[[table[0], len(table)]] for table in tables]
    scales = [runner.rope.scale_for_length(p) for p in PROMPT_LENS]
    prompts = [
        SequenceStep(tokens[:p], 0, tables[i], scale=scales[i], block_runs=runs[i]) for i, p in enumerate(PROMPT_LENS)
    ]
    runner.execute(prompts)
    lengths, logits = list(PROMPT_LENS), []
    for _ in range(steps):
        new_scales = [runner.rope.scale_for_length(n + 1) for n in lengths]
        result = runner.execute(
            [
                SequenceStep([tokens[n]], n, tables[i], scales[i], scale=new_scales[i], block_runs=runs[i])
                for i, n in enumerate(lengths)
            ]
        )
        logits.append(result.last_logits)
        scales, lengths = new_scales, [n + 1 for n in lengths]
    return torch.stack(logits)


@pytest.mark.parametrize("name", ["llama", "llama_logscale"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_equals_the_path_through_the_modules(name, dtype, monkeypatch):
    runner = runner_for(name, dtype)
    fast = runner.cpu_decode
    assert fast is not None
    tokens = torch.randint(3, 200, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    used = counting_steps(monkeypatch)

    fast_logits, fast_scales = batched_decode_logits(runner, tokens, PROMPT_LENS, steps=12)
    fast_runs = contiguous_decode_logits(runner, tokens, steps=12)
    assert used == [len(PROMPT_LENS)] * 24  # every decode step, no prefill
    runner.cpu_decode = None
    module_logits, scales = batched_decode_logits(runner, tokens, PROMPT_LENS, steps=12)
    module_runs = contiguous_decode_logits(runner, tokens, steps=12)
    assert len(used) == 24
    assert fast_scales == scales and max(scales) > 1
    torch.testing.assert_close(fast_logits, module_logits, atol=0, rtol=0)
    torch.testing.assert_close(fast_runs, module_runs, atol=0, rtol=0)


def test_batches_past_its_rows_take_the_modules(monkeypatch):
    runner = runner_for("llama", "float32")
    tokens = torch.randint(3, 200, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    used = counting_steps(monkeypatch)
    fast_logits, _ = batched_decode_logits(runner, tokens, PROMPT_LENS, steps=3)
    runner.cpu_decode.max_rows = len(PROMPT_LENS) - 1
    module_logits, _ = batched_decode_logits(runner, tokens, PROMPT_LENS, steps=3)
    assert used == [len(PROMPT_LENS)] * 3
    torch.testing.assert_close(fast_logits, module_logits, atol=0, rtol=0)


@pytest.mark.parametrize(("name", "applies"), [("llama", True), ("phi", False), ("mixtral", False)])
def test_only_models_whose_every_layer_fused(name, applies):
    assert (runner_for(name, "float32").cpu_decode is not None) == applies
