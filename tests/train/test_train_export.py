"""The exported folder loads in the engine, which then gives transformers' logits on the same weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep
from clex_serve.loading.loader import load_model
from clex_serve.train.export import export_model
from clex_serve.train.model import ModelShape, build_model, rotary_of

SHAPE = ModelShape(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2, base_len=16)


def _trained_looking_model(use_clex: bool):
    torch.set_num_threads(1)
    model = build_model(SHAPE, use_clex, seed=0).eval()
    with torch.no_grad():  # move off the init so that a wrong rotation or a missing weight shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _engine_logits(folder, ids):
    loaded = load_model(folder, dtype="float32", device="cpu", show_progress=False)
    runner = ModelRunner(loaded, num_blocks=8, block_size=16)
    blocks = list(range((len(ids) + 15) // 16))
    step = SequenceStep(ids, 0, blocks, all_logits=True, scale=runner.rope.scale_for_length(len(ids)))
    return runner.execute([step]).all_logits[0]


@pytest.mark.parametrize("use_clex", [True, False])
def test_engine_matches_transformers_within_the_training_length(tmp_path, use_clex):
    model = _trained_looking_model(use_clex)
    folder = export_model(model, SHAPE, tmp_path / "m", tmp_path, use_clex, max_factor=4)
    ids = [5, 17, 3, 90, 44, 8, 8, 61, 2, 33, 70, 12]
    # The reference is a stock LlamaForCausalLM (its own RoPE) holding the same weights: t = 1 is plain Llama.
    reference = LlamaForCausalLM(SHAPE.llama_config()).eval()
    missing, unexpected = reference.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}, strict=False
    )
    assert not unexpected and all("rotary_emb" in k for k in missing)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_engine_logits(folder, ids), expected, rtol=1e-4, atol=1e-4)


def test_clex_scale_above_one_matches_the_training_rotary(tmp_path):
    model = _trained_looking_model(True)
    folder = export_model(model, SHAPE, tmp_path / "m", tmp_path, True, max_factor=4)
    ids = [(7 * i) % 90 + 3 for i in range(40)]  # 40 tokens over L0 = 16: the engine picks t = 3
    rotary_of(model).set_step(torch.arange(40, dtype=torch.float32), scale=3)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_engine_logits(folder, ids), expected, rtol=1e-4, atol=1e-4)


def test_layout_and_config(tmp_path):
    folder = export_model(
        _trained_looking_model(True), SHAPE, tmp_path / "m", tmp_path, True, max_factor=4, dtype="bfloat16"
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["max_position_embeddings"] == 16
    assert config["rope_scaling"] == {
        "type": "clex",
        "max_factor": 4,
        "param_factor": 1,
        "time_dt": 0.01,
        "act": "silu",
        "factor": 4,
    }
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["model.clex_layer.proj_func.ode_up_proj"].shape == (16, 32)
    assert tensors["model.clex_layer.proj_func.ode_down_proj"].dtype == torch.float32  # the ODE stays exact
    assert tensors["model.clex_layer.inv_freq"].shape == (16,)
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
