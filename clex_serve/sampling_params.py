"""Sampling parameters, in vLLM's names so that users' scripts carry over. Validated once, then frozen."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from clex_serve.structured_outputs import StructuredOutputsParams

# The type each field must have (bool is refused where a number is expected: True is not a temperature).
_INTEGERS = ("n", "top_k", "min_tokens")
_OPTIONAL_INTEGERS = ("seed", "max_tokens", "logprobs", "prompt_logprobs")
_NUMBERS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_FLAGS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RequestOutputKind(enum.Enum):
    """What each output of a request carries (vLLM's names)."""

    CUMULATIVE = 0  # everything generated so far
    DELTA = 1  # only what is new since the previous output: what streaming consumers want
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' rule, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI's rules, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's length limit
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top alternatives returned per generated token (the sampled one always)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # token id -> bias added to its logit before sampling (OpenAI's logit_bias, in [-100, 100]); a dict is
    # accepted and frozen as sorted (token id, bias) pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # What the output must match (a JSON schema, a regex, a grammar, ...); None: free text.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._check_types()
        # Accept lists and single strings the way vLLM does, then freeze them as tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        object.__setattr__(self, "logit_bias", _frozen_logit_bias(self.logit_bias))
        self._validate()

    def _check_types(self) -> None:
        """Every field has its type, and every number is finite: a request cannot fail later, mid-batch."""
        for name in _INTEGERS:
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in _OPTIONAL_INTEGERS:
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ValueError(f"{name} must be an integer or None, got {value!r}")
        for name in _NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        stop = self.stop
        if not (
            isinstance(stop, str)
            or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop))
            or stop is None
        ):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        ids = self.stop_token_ids
        if not (ids is None or (isinstance(ids, (list, tuple)) and all(_is_int(t) for t in ids))):
            raise ValueError(f"stop_token_ids must be a list of integers, got {ids!r}")

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be non-negative, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be positive, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
            ),
            (all(self.stop), "stop strings must not be empty"),
            (
                all(t >= 0 for t in self.stop_token_ids),
                f"stop_token_ids must be non-negative, got {list(self.stop_token_ids)}",
            ),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """top-k, top-p or min-p narrow the distribution a token is sampled from."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _frozen_logit_bias(value) -> tuple[tuple[int, float], ...]:
    """``{token id: bias}`` (or pairs) as sorted pairs; each id a non-negative integer, each bias finite in
    [-100, 100], OpenAI's range (-100 bans a token in practice, 100 all but forces it)."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(token_id, bias) for token_id, bias in items]
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias must map token ids to numbers, got {value!r}") from None
    for token_id, bias in pairs:
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"logit_bias: token id {token_id!r} is not a non-negative integer")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"logit_bias: the bias of token {token_id} must be a number in [-100, 100], got {bias!r}")
    return tuple(sorted((token_id, float(bias)) for token_id, bias in dict(pairs).items()))
