"""Whether a tokenizer can drive a model: every id it can produce must be a row of the model's embedding."""

from __future__ import annotations


def check_tokenizer_fits(tokenizer, vocab_size: int, tokenizer_source: str) -> None:
    """``ValueError`` naming both sizes when the tokenizer has ids at or past ``vocab_size``: a tokenizer
    with *fewer* tokens is fine (checkpoints often pad the embedding to a multiple of 64 or 128), but one
    with more would fail every request that uses them, so it is refused at load instead."""
    ids = list(tokenizer.get_vocab().values())
    ids += [token_id for token_id in getattr(tokenizer, "all_special_ids", []) if token_id is not None]
    largest = max(ids, default=-1)
    if largest >= vocab_size:
        raise ValueError(
            f"the tokenizer from {tokenizer_source} has {len(tokenizer)} tokens (ids up to {largest}), but the "
            f"model's vocabulary has {vocab_size} (vocab_size in config.json): pass the model's own tokenizer "
            f"with --tokenizer"
        )
