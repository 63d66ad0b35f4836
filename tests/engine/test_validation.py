"""Every bad value a user can pass gets a one-line ValueError that names the parameter (or config key) and
the value, before any work starts: config.json, engine settings, sampling parameters, prompts."""

import json
import math

import pytest

from clex_serve import LLM, SamplingParams
from clex_serve.config import ModelConfig, read_lenient_json
from clex_serve.engine.engine_config import EngineConfig
from helpers.models import model_with_tokenizer
from helpers.reference import FIXTURES


def _config_with(tmp_path, **changes):
    raw = json.loads((FIXTURES / "llama" / "config.json").read_text())
    raw.update(changes)
    if "rope_scaling_max_factor" in changes:
        raw["rope_scaling"] = dict(raw["rope_scaling"], max_factor=changes.pop("rope_scaling_max_factor"))
        raw.pop("rope_scaling_max_factor")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_config_holding_a_json_list(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError) as error:
        read_lenient_json(path)
    assert "must hold a JSON object, got a JSON list" in _one_line(error)


@pytest.mark.parametrize(
    "changes,named",
    [
        (dict(rope_scaling_max_factor="sixteen"), "rope_scaling.max_factor must be an integer, got 'sixteen'"),
        (dict(hidden_size="wide"), "hidden_size must be an integer, got 'wide'"),
        (dict(num_hidden_layers=2.5), "num_hidden_layers must be an integer, got 2.5"),
        (dict(rms_norm_eps="tiny"), "rms_norm_eps must be a number, got 'tiny'"),
        (dict(rope_theta=[1]), "rope_theta must be a number, got [1]"),
    ],
)
def test_config_values_of_the_wrong_type_name_their_key(tmp_path, changes, named):
    with pytest.raises(ValueError) as error:
        ModelConfig.from_file(_config_with(tmp_path, **changes))
    assert named in _one_line(error)


@pytest.mark.parametrize(
    "bad,named",
    [
        (dict(max_tokens=2.5), "max_tokens must be an integer or None, got 2.5"),
        (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
        (dict(temperature=math.inf), "temperature must be a finite number, got inf"),
        (dict(top_p=math.nan), "top_p must be a finite number, got nan"),
        (dict(n=True), "n must be an integer, got True"),
        (dict(seed="1"), "seed must be an integer or None, got '1'"),
        (dict(stop=[1]), "stop must be a string or a list of strings, got [1]"),
        (dict(stop_token_ids=["2"]), "stop_token_ids must be a list of integers, got ['2']"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be non-negative, got [-1]"),
        (dict(ignore_eos="yes"), "ignore_eos must be true or false, got 'yes'"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens (5) must not exceed max_tokens (2)"),
        (dict(temperature=-1), "temperature must be non-negative, got -1"),
        (dict(logit_bias={5: 101}), "logit_bias: the bias of token 5 must be a number in [-100, 100], got 101"),
        (dict(logit_bias={-1: 1}), "logit_bias: token id -1 is not a non-negative integer"),
        (dict(logit_bias={"5": 1}), "logit_bias: token id '5' is not a non-negative integer"),
        (dict(logit_bias=[1, 2]), "logit_bias must map token ids to numbers"),
    ],
)
def test_bad_sampling_params_name_the_parameter(bad, named):
    with pytest.raises(ValueError) as error:
        SamplingParams(**bad)
    assert named in _one_line(error)


def test_logit_bias_is_frozen_as_sorted_pairs():
    assert SamplingParams(logit_bias={7: -100, 3: 2.5}).logit_bias == ((3, 2.5), (7, -100.0))
    assert SamplingParams(logit_bias=None).logit_bias == ()


@pytest.mark.parametrize(
    "bad,named",
    [
        (dict(max_model_len=0), "max_model_len must be positive, got 0"),
        (dict(max_num_seqs=0), "max_num_seqs must be at least 1, got 0"),
        (dict(max_num_seqs=2.5), "max_num_seqs must be an integer, got 2.5"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization must be in (0, 1], got 1.5"),
        (dict(kv_cache_memory_gib=-1), "kv_cache_memory_gib must be positive, got -1"),
        (dict(max_queued_requests=-1), "max_queued_requests must be non-negative, got -1"),
        (dict(threads=0), "threads must be at least 1, got 0"),
    ],
)
def test_bad_engine_settings_name_the_python_parameter(bad, named):
    with pytest.raises(ValueError) as error:
        EngineConfig(**bad)
    message = _one_line(error)
    assert named in message and "--" not in message


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(
        str(model_with_tokenizer("llama", tmp_path_factory.mktemp("model"))),
        dtype="float32",
        device="cpu",
        show_progress=False,
    )


def test_max_model_len_beyond_the_model_limit_needs_a_flag(llm):
    folder = llm.engine.model_path
    with pytest.raises(ValueError) as error:
        LLM(str(folder), device="cpu", show_progress=False, max_model_len=8192)
    assert "max_model_len 8192 exceeds the model's limit of 128 tokens" in _one_line(error)
    assert "allow_long_max_model_len" in str(error.value)
    longer = LLM(str(folder), device="cpu", show_progress=False, max_model_len=256, allow_long_max_model_len=True)
    assert longer.engine.max_model_len == 256


@pytest.mark.parametrize(
    "prompt,named",
    [
        ({"prompt_token_ids": [1, 2, 320, 4]}, "prompt token id 320 at position 2 is not in the vocabulary [0, 320)"),
        ({"prompt_token_ids": [1, -3]}, "prompt token id -3 at position 1 is not in the vocabulary"),
        ({"prompt_token_ids": [1, "2"]}, "prompt token id '2' at position 1 is not in the vocabulary"),
        ({"prompt_token_ids": []}, "the prompt is empty"),
        (42, "a prompt is a string, a list of token ids, or {'prompt_token_ids': [...]}; got int"),
    ],
)
def test_bad_prompts_are_refused_with_the_bad_value(llm, prompt, named):
    with pytest.raises(ValueError) as error:
        llm.generate(prompt, SamplingParams(max_tokens=2))
    assert named in _one_line(error)
    assert not llm.engine.has_unfinished_requests()


def test_out_of_vocabulary_stop_id_and_logprobs_are_refused(llm):
    with pytest.raises(ValueError, match=r"stop_token_ids: 400 is not in the vocabulary \[0, 320\)"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(stop_token_ids=[400]))
    with pytest.raises(ValueError, match="sampling params must be a SamplingParams, got dict"):
        llm.generate({"prompt_token_ids": [1, 2]}, {"temperature": 0})
