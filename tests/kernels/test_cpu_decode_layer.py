"""The whole-layer C++ decode on the CPU equals the layer-by-layer path bit for bit (the golden CLEX
checkpoints, float32 and bfloat16, across scale changes and with the log scale), and decode steps use it."""

import pytest
import torch

from clex_serve.engine.worker.model_runner import ModelRunner
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_decode_layer import CpuLlamaDecoderLayer
from clex_serve.kernels.cpu_extension import cpu_kernels_available
from clex_serve.loading.loader import load_model
from clex_serve.models.llama import LlamaDecoderLayer
from helpers.models import FIXTURES, batched_decode_logits

pytestmark = [
    pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here"),
    pytest.mark.usefixtures("each_cpu_isa"),
]


@pytest.mark.parametrize("name", ["llama", "llama_logscale"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decode_layer_equals_the_layer_by_layer_path(name, dtype, monkeypatch):
    runner = ModelRunner(
        load_model(FIXTURES / name, dtype=dtype, device="cpu", show_progress=False),
        num_blocks=96,
        block_size=4,
        max_num_seqs=8,
    )
    assert all(isinstance(layer, CpuLlamaDecoderLayer) for layer in runner.model.model.layers)  # swapped in once
    runner.cpu_decode = None  # decode steps through the modules (the whole-step call: test_cpu_decode_step)
    tokens = torch.randint(3, 200, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt_lens = [5, 14, 31]  # three sequences, whose lengths cross CLEX scales while decoding

    used = []
    fused = cpu_ops.llama_decode_layer

    def counting(*args):
        used.append(True)
        return fused(*args)

    monkeypatch.setattr(cpu_ops, "llama_decode_layer", counting)
    with_fused, fused_scales = batched_decode_logits(runner, tokens, prompt_lens, steps=12)
    assert sum(used) == 12 * runner.config.num_hidden_layers  # every decode step, every layer; prefills not
    monkeypatch.setattr(CpuLlamaDecoderLayer, "forward", LlamaDecoderLayer.forward)  # the layer-by-layer path
    layer_by_layer, scales = batched_decode_logits(runner, tokens, prompt_lens, steps=12)
    assert sum(used) == 12 * runner.config.num_hidden_layers
    assert fused_scales == scales and max(scales) > 1
    torch.testing.assert_close(with_fused, layer_by_layer, atol=0, rtol=0)
