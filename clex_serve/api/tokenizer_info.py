"""``GET /tokenizer_info`` (vLLM's route): what a client needs to tokenize as the server does, so that
lm-evaluation-harness and similar tools need not download the tokenizer from a hub."""

from __future__ import annotations


def tokenizer_info(tokenizer, vocab_size: int, max_model_len: int, chat_template: str | None) -> dict:
    def token(name: str) -> str | None:
        value = getattr(tokenizer, name, None)
        return value if isinstance(value, str) else None

    add_bos = getattr(tokenizer, "add_bos_token", None)
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": vocab_size,
        "model_max_length": max_model_len,
        "bos_token": token("bos_token"),
        "eos_token": token("eos_token"),
        "pad_token": token("pad_token"),
        "unk_token": token("unk_token"),
        "chat_template": chat_template,
        "add_bos_token": add_bos if isinstance(add_bos, bool) else None,
    }
