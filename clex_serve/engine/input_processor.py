"""A request's prompt and parameters, tokenized and checked completely before the engine admits it.

Everything that could make a request fail inside a step shared with others is refused here, with a message
that names the parameter and the bad value: prompt token ids outside the vocabulary, stop token ids outside
it, a prompt as long as the model's limit. This reads no engine state, so a server runs it off its event
loop, in a worker thread, while the engine thread keeps stepping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clex_serve.engine.structured.compiler import GrammarCompiler
from clex_serve.sampling_params import SamplingParams


@dataclass
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams
    grammar: Any = None  # the compiled grammar of params.structured_outputs


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PromptTooLongError(ValueError):
    """A prompt that leaves no room for output: ``num_tokens`` is its length, or a lower bound on it when it
    was refused by its length in characters, before tokenizing (``exact`` is then False)."""

    def __init__(self, message: str, num_tokens: int, max_model_len: int, exact: bool = True) -> None:
        super().__init__(message)
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len
        self.exact = exact


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers: the longest vocabulary entry (byte-level and
    byte-fallback entries are at least as long as the text they stand for)."""
    try:
        return max(1, max(len(token) for token in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return 1 << 16  # unknown: a bound that refuses nothing a body limit lets through


def check_unicode(text: str, what: str = "the prompt") -> None:
    """Lone surrogates (possible in JSON and in Python strings) cannot be encoded: say so, by position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{what} has a lone surrogate {text[error.start]!r} at character {error.start}: send valid Unicode"
        ) from None


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, grammars: GrammarCompiler | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.grammars = grammars
        # Text longer than this cannot fit the context whatever it says: refused before it is tokenized.
        self.max_prompt_chars = max_model_len * longest_token_chars(tokenizer)

    def check_text_length(self, num_chars: int, what: str = "the prompt") -> None:
        if num_chars > self.max_prompt_chars:
            at_least = -(-num_chars // (self.max_prompt_chars // self.max_model_len))
            raise PromptTooLongError(
                f"{what} has {num_chars} characters, more than the {self.max_model_len} tokens this model reads "
                f"can hold (no token is longer than {self.max_prompt_chars // self.max_model_len} characters)",
                at_least,
                self.max_model_len,
                exact=False,
            )

    def tokenize(self, text: str) -> list[int]:
        check_unicode(text)
        self.check_text_length(len(text))
        return self.tokenizer.encode(text, add_special_tokens=True)

    def process(self, prompt, params: SamplingParams | None = None) -> ProcessedPrompt:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self._prompt_tokens(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        for position, token_id in enumerate(token_ids):
            if not _is_token_id(token_id) or not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"prompt token id {token_id!r} at position {position} is not in the vocabulary "
                    f"[0, {self.vocab_size})"
                )
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens, but this model reads at most {self.max_model_len} "
                f"(prompt and output together); shorten it or raise max_model_len",
                len(token_ids),
                self.max_model_len,
            )
        self.check_params(params)
        return ProcessedPrompt(text, token_ids, params, self.compile_grammar(params))

    def compile_grammar(self, params: SamplingParams):
        """The compiled grammar of the request's structured outputs (None without any): compiled here, in the
        thread that checks the request, never on the engine's; ``GrammarError`` (a ValueError) when it
        cannot be."""
        if params.structured_outputs is None:
            return None
        if self.grammars is None:
            raise ValueError("structured outputs need a grammar compiler, which this engine was built without")
        return self.grammars.compile(params.structured_outputs)

    def check_params(self, params: SamplingParams) -> None:
        """What of the sampling parameters depends on the model: token ids in the vocabulary."""
        for token_id in params.stop_token_ids:
            if token_id >= self.vocab_size:
                raise ValueError(f"stop_token_ids: {token_id} is not in the vocabulary [0, {self.vocab_size})")
        for token_id, _ in params.logit_bias:
            if token_id >= self.vocab_size:
                raise ValueError(f"logit_bias: token id {token_id} is not in the vocabulary [0, {self.vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name} must be at most the vocabulary size {self.vocab_size}, got {value}")

    def _prompt_tokens(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenize(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._ids(prompt["prompt_token_ids"])
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return prompt["prompt"], self.tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            return None, self._ids(prompt)
        raise ValueError(
            f"a prompt is a string, a list of token ids, or {{'prompt_token_ids': [...]}}; got {type(prompt).__name__}"
        )

    @staticmethod
    def _ids(values) -> list[int]:
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"prompt_token_ids must be a list of integers, got {type(values).__name__}")
        return list(values)
