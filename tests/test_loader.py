"""Checkpoint loading: formats, dtypes, and one-line errors for what is wrong with a checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from clex_serve.engine.loader import load_model
from clex_serve.engine.model_source import ModelNotFoundError
from clex_serve.engine.weights import CheckpointError
from conftest import FIXTURES


def _copy_fixture(name, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURES / name / "config.json", folder)
    return folder, load_file(str(FIXTURES / name / "model.safetensors"))


def _first_logits(folder, **kwargs):
    from clex_serve.engine.model_runner import ModelRunner, SequenceStep
    loaded = load_model(folder, device="cpu", show_progress=False, **kwargs)
    runner = ModelRunner(loaded, num_blocks=4, block_size=16)
    return runner.execute([SequenceStep([3, 5, 7, 11], 0, [0])]).last_logits[0]


@pytest.fixture(scope="module")
def reference_logits():
    return _first_logits(FIXTURES / "mixtral", dtype="float32")


def test_sharded_safetensors_with_index(tmp_path, reference_logits):
    folder, weights = _copy_fixture("mixtral", tmp_path)
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(_first_logits(folder, dtype="float32"), reference_logits)


def test_pytorch_bin_checkpoint(tmp_path, reference_logits):
    folder, weights = _copy_fixture("mixtral", tmp_path)
    torch.save(weights, folder / "pytorch_model.bin")
    torch.testing.assert_close(_first_logits(folder, dtype="float32"), reference_logits)


def test_bfloat16_keeps_clex_tables_in_float32(reference_logits):
    loaded = load_model(FIXTURES / "llama", dtype="bfloat16", device="cpu", show_progress=False)
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.scaled_inv_freq.dtype == torch.float32
    bf16 = _first_logits(FIXTURES / "mixtral", dtype="bfloat16")
    assert (bf16 - reference_logits).abs().max() < 0.1


def test_missing_weight_is_named(tmp_path):
    folder, weights = _copy_fixture("llama", tmp_path)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"^checkpoint is incomplete: weight model.layers.1.mlp.up_proj.weight is missing$"):
        load_model(folder, show_progress=False)


def test_misshaped_weight_is_named(tmp_path):
    folder, weights = _copy_fixture("phi", tmp_path)
    weights["model.layers.0.self_attn.dense.weight"] = torch.zeros(64, 32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"weight model.layers.0.self_attn.dense.weight has shape \[64, 32\]"):
        load_model(folder, show_progress=False)


def test_truncated_file_gives_one_line(tmp_path):
    folder, _ = _copy_fixture("llama", tmp_path)
    data = (FIXTURES / "llama" / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_model(folder, show_progress=False)
    assert "model.safetensors" in str(error.value) and "\n" not in str(error.value)


def test_no_weights_at_all(tmp_path):
    folder, _ = _copy_fixture("llama", tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(folder, show_progress=False)


def test_hub_id_offline_names_the_id_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as error:
        load_model("DAMO-NLP-SG/CLEX-7B-Chat-16K", show_progress=False)
    message = str(error.value)
    assert "DAMO-NLP-SG/CLEX-7B-Chat-16K" in message and "--model DIR" in message and "\n" not in message


def test_not_a_folder_nor_hub_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "missing" / "model" / "dir"), show_progress=False)
