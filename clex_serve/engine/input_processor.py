"""A request's prompt and parameters, tokenized and checked completely before the engine admits it.

Everything that could make a request fail inside a step shared with others is refused here, with a message
that names the parameter and the bad value: prompt token ids outside the vocabulary, stop token ids outside
it, a prompt as long as the model's limit. This reads no engine state, so a server runs it off its event
loop, in a worker thread, while the engine thread keeps stepping.
"""

from __future__ import annotations

from dataclasses import dataclass

from clex_serve.sampling_params import SamplingParams


@dataclass
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def tokenize(self, text: str) -> list[int]:
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
                raise ValueError(f"prompt token id {token_id!r} at position {position} is not in the vocabulary "
                                 f"[0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but this model reads at most {self.max_model_len} "
                f"(prompt and output together); shorten it or raise max_model_len"
            )
        for token_id in params.stop_token_ids:
            if token_id >= self.vocab_size:
                raise ValueError(f"stop_token_ids: {token_id} is not in the vocabulary [0, {self.vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name} must be at most the vocabulary size {self.vocab_size}, got {value}")
        return ProcessedPrompt(text, token_ids, params)

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
        raise ValueError(f"a prompt is a string, a list of token ids, or {{'prompt_token_ids': [...]}}; "
                         f"got {type(prompt).__name__}")

    @staticmethod
    def _ids(values) -> list[int]:
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"prompt_token_ids must be a list of integers, got {type(values).__name__}")
        return list(values)
