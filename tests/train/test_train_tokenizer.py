"""The BPE tokenizer in Hugging Face format, its Vicuna chat template, and the chat fine-tune examples."""

import pytest
from transformers import AutoTokenizer

from clex_serve.train.corpus import list_source_files
from clex_serve.train.instructions import InstructionPair
from clex_serve.train.sft import IGNORE_INDEX, chat_prompt, encode_example
from clex_serve.train.tokenizer import VICUNA_SYSTEM, save_hf_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    texts = [f.read() for f in list_source_files()[:20]]
    tokenizer = train_tokenizer(texts, 400)
    folder = tmp_path_factory.mktemp("tok")
    save_hf_tokenizer(tokenizer, folder, 2048)
    return tokenizer, AutoTokenizer.from_pretrained(str(folder)), folder


def test_vocab_and_special_tokens(tokenizers):
    tokenizer, hf, _ = tokenizers
    assert tokenizer.get_vocab_size() == 400
    assert (hf.bos_token, hf.eos_token) == ("<s>", "</s>")
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    ids = hf("def f(x):\n    return x").input_ids
    assert ids[0] == hf.bos_token_id and ids.count(hf.bos_token_id) == 1
    assert hf.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x"  # byte-level: lossless


def test_chat_template_is_vicuna_v1_1(tokenizers):
    _, hf, folder = tokenizers
    assert "chat_template" in (folder / "tokenizer_config.json").read_text()
    messages = [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == f"<s>{VICUNA_SYSTEM} USER: Hi? ASSISTANT: Hello.</s>USER: Bye? ASSISTANT:"
    custom = hf.apply_chat_template([{"role": "system", "content": "Be brief."}, messages[0]], tokenize=False)
    assert custom == "<s>Be brief. USER: Hi? "


def test_chat_examples_match_the_template_and_mask_the_prompt(tokenizers):
    tokenizer, hf, _ = tokenizers
    pair = InstructionPair("What does json.dumps do?", "Serialize obj to a JSON formatted str.")
    assert chat_prompt(pair.question) == hf.apply_chat_template(
        [{"role": "user", "content": pair.question}], add_generation_prompt=True, tokenize=False
    )
    ids, labels = encode_example(tokenizer, pair, 512)
    full = hf.apply_chat_template(
        [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}], tokenize=False
    )
    assert ids == tokenizer.encode(full, add_special_tokens=False).ids
    answer_ids = [label for label in labels if label != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids, skip_special_tokens=False) == " " + pair.answer + "</s>"
    assert labels[: len(ids) - len(answer_ids)] == [IGNORE_INDEX] * (len(ids) - len(answer_ids))


def test_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 100)
