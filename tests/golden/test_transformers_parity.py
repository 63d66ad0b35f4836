"""At t = 1 a CLEX model is its base model: our logits equal those of the installed transformers' classes.

Each case builds a small random model with transformers (fixed seed), saves it, loads it with clex-serve,
and compares a one-pass prefill and cached decode steps (teacher-forced) with transformers' full forward.
"""

import json

import pytest
import torch
import transformers

from clex_serve.engine.worker.model_runner import ModelRunner
from clex_serve.loading.loader import load_model
from helpers.reference import DEVICES, FIXTURES, REFERENCE_MODELS, SingleSequence, reference_cases

TOLERANCE = 1e-4
SEQ_LEN = 48
PREFILL_LEN = 20

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=7)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.4, hidden_act="gelu_new")),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    ),
    "mixtral-sliding-window": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=9),
    ),
}


def _build_reference(case: str, tmp_path, **extra):
    config_name, model_name, specific = CASES[case]
    config = getattr(transformers, config_name)(**{**COMMON, **specific, **extra})
    torch.manual_seed(1234)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random weights large enough that errors would show
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(tmp_path)
    return model


def _reference_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def _ours(tmp_path, device="cpu", **overrides):
    loaded = load_model(tmp_path, dtype="float32", device=device, show_progress=False, config_overrides=overrides)
    return ModelRunner(loaded, num_blocks=64, block_size=4, max_num_seqs=4)


def _prefill_and_decode(runner, tokens, prefill_len):
    sequence = SingleSequence(runner, len(tokens))
    first = sequence.feed(tokens[:prefill_len], all_logits=True)
    rows = [first.all_logits[0].cpu()]
    for token in tokens[prefill_len:-1]:
        rows.append(sequence.feed([token]).last_logits.cpu())
    return torch.cat(rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_and_cached_decode_match_transformers(case, device, tmp_path):
    reference = _build_reference(case, tmp_path)
    tokens = torch.randint(0, COMMON["vocab_size"], (SEQ_LEN,), generator=torch.Generator().manual_seed(7)).tolist()
    expected = _reference_logits(reference, tokens)
    ours = _prefill_and_decode(_ours(tmp_path, device), tokens, PREFILL_LEN)
    assert ours.shape == expected[:-1].shape
    torch.testing.assert_close(ours, expected[:-1], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_scaled_rope_prefill_matches_transformers(rope_scaling, device, tmp_path):
    """One pass longer than the base window, where each scaling scheme actually changes the frequencies."""
    reference = _build_reference(
        "llama", tmp_path, max_position_embeddings=16, rope_parameters={"rope_theta": 10000.0, **rope_scaling}
    )
    assert (
        json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == rope_scaling["rope_type"]
    )
    tokens = torch.randint(0, COMMON["vocab_size"], (SEQ_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = _reference_logits(reference, tokens)
    sequence = SingleSequence(_ours(tmp_path, device), SEQ_LEN)
    ours = sequence.feed(tokens, all_logits=True).all_logits[0].cpu()
    torch.testing.assert_close(ours, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_clex_checkpoint_within_base_window_is_the_plain_model(name, device, tmp_path):
    """The CLEX fixtures with their CLEX keys dropped, run by transformers, give our CLEX logits at t = 1."""
    from safetensors.torch import load_file, save_file

    raw = json.loads((FIXTURES / name / "config.json").read_text())
    plain = {k: v for k, v in raw.items() if k not in ("rope_scaling", "log_scale", "use_flashattn")}
    (tmp_path / "config.json").write_text(json.dumps(plain))
    weights = load_file(str(FIXTURES / name / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if "clex_layer" not in k},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    tokens = reference_cases(name)["sequence"][:32].tolist()  # L0 = 32: the whole window at t = 1
    expected = _reference_logits(reference, tokens)
    loaded = load_model(
        FIXTURES / name, dtype="float32", device=device, show_progress=False, config_overrides={"log_scale": False}
    )
    ours = _prefill_and_decode(ModelRunner(loaded, num_blocks=32, block_size=4, max_num_seqs=4), tokens + [0], 12)
    torch.testing.assert_close(ours, expected, atol=TOLERANCE, rtol=0)


def test_dynamic_ntk_cached_decode_matches_transformers_cache(tmp_path):
    """Past its base window dynamic NTK rotates each new token with the frequencies of the length it makes,
    and cached keys keep theirs: teacher-forced decoding equals transformers' forward with its KV cache."""
    reference = _build_reference(
        "llama",
        tmp_path,
        max_position_embeddings=16,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 4.0},
    )
    tokens = torch.randint(0, COMMON["vocab_size"], (SEQ_LEN,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        out = reference(torch.tensor([tokens[:PREFILL_LEN]]), use_cache=True)
        expected, cache = [out.logits[0, -1]], out.past_key_values
        for token in tokens[PREFILL_LEN:-1]:
            out = reference(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            expected.append(out.logits[0, -1])
            cache = out.past_key_values
    runner = _ours(tmp_path)
    assert not runner.rope.cache_follows_scale
    sequence = SingleSequence(runner, SEQ_LEN)
    ours = [sequence.feed(tokens[:PREFILL_LEN]).last_logits[0]]
    ours += [sequence.feed([token]).last_logits[0] for token in tokens[PREFILL_LEN:-1]]
    torch.testing.assert_close(torch.stack(ours), torch.stack(expected).float(), atol=TOLERANCE, rtol=0)
