"""Checkpoint loading: formats, dtypes, and one-line errors for what is wrong with a checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from clex_serve.loading.loader import load_model
from clex_serve.loading.model_source import ModelNotFoundError
from clex_serve.loading.weights import CheckpointError
from helpers.reference import FIXTURES


def _copy_fixture(name, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURES / name / "config.json", folder)
    return folder, load_file(str(FIXTURES / name / "model.safetensors"))


def _first_logits(folder, **kwargs):
    from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep

    loaded = load_model(folder, device="cpu", show_progress=False, **kwargs)
    runner = ModelRunner(loaded, num_blocks=4, block_size=16)
    return runner.execute([SequenceStep([3, 5, 7, 11], 0, [0], scale=runner.rope.scale_for_length(4))]).last_logits[0]


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
    with pytest.raises(
        CheckpointError, match=r"^checkpoint is incomplete: weight model.layers.1.mlp.up_proj.weight is missing$"
    ):
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


def test_dummy_load_format_fills_every_weight_from_the_config_alone(tmp_path):
    """``load_format="dummy"`` needs only config.json, fills each matrix with seeded N(0, 0.02) (the same seed
    gives the same weights), keeps CLEX's inv_freq from the config, and names the tensors as transformers
    does (the GPU benchmark copies them into a transformers model by these names)."""
    import shutil

    import transformers

    from clex_serve.loading.loader import checkpoint_tensors

    shutil.copy(FIXTURES / "llama" / "config.json", tmp_path / "config.json")
    first = load_model(tmp_path, load_format="dummy", dtype="float32", device="cpu", show_progress=False, seed=3)
    again = load_model(tmp_path, load_format="dummy", dtype="float32", device="cpu", show_progress=False, seed=3)
    ours = checkpoint_tensors(first.model)
    for name, tensor in ours.items():
        assert torch.equal(tensor, checkpoint_tensors(again.model)[name]), name
    qkv = first.model.model.layers[0].self_attn.qkv_proj.weight
    assert 0.015 < qkv.std().item() < 0.025 and qkv.unique().numel() > 1000
    assert torch.equal(first.model.model.norm.weight, torch.ones_like(first.model.model.norm.weight))
    reference = load_model(FIXTURES / "llama", dtype="float32", device="cpu", show_progress=False)
    torch.testing.assert_close(first.model.rotary_emb.scaled_inv_freq[0], reference.model.rotary_emb.scaled_inv_freq[0])

    raw = json.loads((FIXTURES / "llama" / "config.json").read_text())
    config = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k not in ("rope_scaling", "log_scale")})
    theirs = {name for name, _ in transformers.LlamaForCausalLM(config).named_parameters()}
    assert theirs == set(ours) - {
        "model.rotary_emb.inv_freq",
        "model.rotary_emb.proj_func.ode_up_proj",
        "model.rotary_emb.proj_func.ode_down_proj",
    }


def test_unknown_load_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="load format 'npz'"):
        load_model(FIXTURES / "llama", load_format="npz", device="cpu", show_progress=False)


def test_a_tokenizer_fits_when_its_ids_are_rows_of_the_embedding():
    """Fewer tokens than embedding rows is common and fine (Llama-2: 32000 of 32000, Qwen2: 151646 of 151936);
    an id at vocab_size or past it, even only a special token's, is refused with both sizes named."""
    from clex_serve.loading.tokenizer_fit import check_tokenizer_fits
    from helpers.models import word_level_tokenizer

    check_tokenizer_fits(word_level_tokenizer(320), 320, "here")
    check_tokenizer_fits(word_level_tokenizer(300), 320, "here")
    with pytest.raises(
        ValueError,
        match=r"from here has 321 tokens \(ids up to 320\), but the model's vocabulary "
        r"has 320 \(vocab_size in config.json\)",
    ):
        check_tokenizer_fits(word_level_tokenizer(321), 320, "here")
    padded = word_level_tokenizer(300)
    padded.add_special_tokens({"pad_token": "<pad>"})  # id 300: still inside a 320-row embedding
    check_tokenizer_fits(padded, 320, "here")
    with pytest.raises(ValueError, match="ids up to 300"):
        check_tokenizer_fits(padded, 300, "here")
