"""The model shipped in the package loads offline, chats in the Vicuna format and serves 16x its length."""

import math

import torch
from transformers import AutoTokenizer

from clex_serve.assets import DEFAULT_MODEL_PATH
from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep
from clex_serve.loading.loader import load_model


def test_default_model_is_a_clex_llama_with_a_2048_token_limit():
    torch.set_num_threads(1)
    loaded = load_model(DEFAULT_MODEL_PATH, dtype="float32", device="cpu", show_progress=False)
    assert loaded.config.is_clex and loaded.config.max_position_embeddings == 128
    assert loaded.config.max_model_len == 2048
    runner = ModelRunner(loaded, num_blocks=128, block_size=16)
    ids = [(5 * i) % 4000 + 3 for i in range(2048)]
    scale = runner.rope.scale_for_length(len(ids))
    result = runner.execute([SequenceStep(ids, 0, list(range(128)), scale=scale)])
    assert scale == 16
    assert torch.isfinite(result.last_logits).all()


def test_default_model_answers_a_chat_prompt_with_text_then_eos():
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_PATH))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does json.dumps do?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("USER: What does json.dumps do? ASSISTANT:")
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    runner = ModelRunner(
        load_model(DEFAULT_MODEL_PATH, dtype="float32", device="cpu", show_progress=False), num_blocks=16, block_size=16
    )
    scale = runner.rope.scale_for_length(len(ids))
    result = runner.execute([SequenceStep(ids, 0, list(range(16)), scale=scale)])
    generated, length = [], len(ids)
    for _ in range(80):
        token = int(result.last_logits[0].argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        next_scale = runner.rope.scale_for_length(length + 1)
        result = runner.execute([SequenceStep([token], length, list(range(16)), cache_scale=scale, scale=next_scale)])
        length, scale = length + 1, next_scale
    text = tokenizer.decode(generated)
    assert token == tokenizer.eos_token_id, f"no </s> after 80 tokens: {text!r}"
    assert text.startswith(" ") and len(text.split()) >= 3 and "USER:" not in text
    assert not math.isnan(float(result.last_logits.sum()))
