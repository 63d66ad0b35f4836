import json

import pytest

from clex_serve.config import ModelConfig
from helpers.reference import FIXTURES

# DAMO-NLP-SG/CLEX-7B-Chat-16K's config as published: a trailing comma, no `act`, no `time_dt`.
RELEASED_CHAT_CONFIG = """{
  "_name_or_path": "DAMO-NLP-SG/CLEX-7B-Chat-16K",
  "architectures": ["LlamaForCausalLM"],
  "auto_map": {"AutoConfig": "configuration_clex.CLEXLlamaConfig",
               "AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"},
  "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 1, "max_factor": 16, "param_factor": 1, "type": "clex"},
  "log_scale": true, "use_flashattn": true, "data_length": 4096,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.33.0",
  "use_cache": true, "vocab_size": 32000,
}"""


def test_released_style_config_loads_with_official_defaults(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(RELEASED_CHAT_CONFIG)
    config = ModelConfig.from_file(path)
    assert config.is_clex and config.rope_scaling.act == "silu" and config.rope_scaling.time_dt == 0.01
    assert config.max_model_len == 4096 * 16
    assert config.applies_log_scale and config.rotary_dim == 128


def test_mixtral_ignores_log_scale_and_phi_uses_partial_rotary():
    mixtral = ModelConfig.from_file(FIXTURES / "mixtral" / "config.json")
    assert mixtral.log_scale and not mixtral.applies_log_scale
    phi = ModelConfig.from_file(FIXTURES / "phi" / "config.json")
    assert phi.rotary_dim == 8 and phi.qkv_bias and phi.family == "phi"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"rope_scaling": {"type": "clex", "max_factor": 4, "act": "relu"}}, "clex act must be one of"),
        ({"rope_scaling": {"type": "clex"}}, "needs 'max_factor'"),
        ({"rope_scaling": {"type": "longrope", "factor": 2}}, "rope_scaling type 'longrope' is not supported"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(change, message, tmp_path):
    raw = json.loads((FIXTURES / "llama" / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig.from_dict(raw)


def test_broken_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"architectures": ["LlamaForCausalLM"')
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_file(path)
