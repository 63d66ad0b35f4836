"""Incremental detokenization that streams correct text for sentencepiece and byte-level BPE tokenizers.

Decoding one token at a time loses what a token means in context: sentencepiece drops a word's leading
space at the start of a decode, and byte-level BPE splits a character's UTF-8 bytes across tokens. So
each step decodes a short window that starts a few tokens back (``prefix_offset``) and emits only what the
window adds beyond the text already read (``read_offset``), holding back while the tail is an incomplete
character (U+FFFD).
"""

from __future__ import annotations

try:  # transformers 5
    from transformers.tokenization_utils_tokenizers import TokenizersBackend as FastTokenizer
except ImportError:  # transformers 4
    from transformers import PreTrainedTokenizerFast as FastTokenizer

# How many prompt tokens of context the first decode window starts with.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        # A fast tokenizer whose decode transformers does not override decodes in Rust: calling that
        # directly gives the same text without transformers' per-call Python (most of a step's host time
        # with many streams: two decodes per token).
        self._rust_decode = None
        if isinstance(tokenizer, FastTokenizer) and type(tokenizer)._decode is FastTokenizer._decode:
            self._rust_decode = tokenizer.backend_tokenizer.decode

    def _decode(self, token_ids: list[int]) -> str:
        if self._rust_decode is not None:
            return self._rust_decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Append a generated token and return the new text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character, or a token that decodes to nothing (a skipped special)
        # Keep the window short: the next one starts where this one read up to.
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of generation: the text still held back (an incomplete character decodes to U+FFFD,
        as decoding the whole output would give), so that nothing generated is lost."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
