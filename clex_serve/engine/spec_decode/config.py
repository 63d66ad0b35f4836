"""``speculative_config``: vLLM's keys, validated once.

``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": m, "prompt_lookup_max": M}`` drafts up
to ``k`` tokens a step by prompt lookup: the longest suffix of ``m..M`` tokens that occurred earlier in the
sequence proposes the tokens that followed it. ``disable_by_batch_size`` (also vLLM's) turns speculation off in
steps that decode more sequences than that. Unset ``prompt_lookup_min``/``max`` take each other's value, and
both default to vLLM's 5 when neither is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram",)
# vLLM keys this engine knows but does not implement: refused by name rather than ignored.
_UNSUPPORTED_VLLM_KEYS = (
    "model",
    "draft_tensor_parallel_size",
    "quantization",
    "max_model_len",
    "revision",
    "code_revision",
    "speculative_token_tree",
    "disable_padded_drafter_batch",
    "parallel_drafting",
    "enforce_eager",
    "suffix_decoding_max_tree_depth",
    "suffix_decoding_max_cached_requests",
    "suffix_decoding_max_spec_factor",
    "suffix_decoding_min_token_prob",
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SpeculativeConfig:
    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int | None = None
    # clex-serve's own: turn speculation down per sequence when its drafts are kept less often than a drafted
    # row costs, and per batch size where rows cost as much as plain tokens (measured: ``adaptive.py``).
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config method {self.method!r} is not supported; the methods are {', '.join(METHODS)}"
            )
        if not _is_int(self.num_speculative_tokens) or self.num_speculative_tokens < 1:
            raise ValueError(
                f"speculative_config num_speculative_tokens must be a positive integer, got "
                f"{self.num_speculative_tokens!r}"
            )
        lookup_min, lookup_max = self.prompt_lookup_min, self.prompt_lookup_max
        for name, value in (("prompt_lookup_min", lookup_min), ("prompt_lookup_max", lookup_max)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"speculative_config {name} must be a positive integer, got {value!r}")
        if lookup_min is None and lookup_max is None:
            lookup_min = lookup_max = 5
        elif lookup_min is None:
            lookup_min = lookup_max
        elif lookup_max is None:
            lookup_max = lookup_min
        if lookup_min > lookup_max:
            raise ValueError(
                f"speculative_config prompt_lookup_min ({lookup_min}) must not exceed prompt_lookup_max ({lookup_max})"
            )
        object.__setattr__(self, "prompt_lookup_min", lookup_min)
        object.__setattr__(self, "prompt_lookup_max", lookup_max)
        if self.disable_by_batch_size is not None and (
            not _is_int(self.disable_by_batch_size) or self.disable_by_batch_size < 1
        ):
            raise ValueError(
                f"speculative_config disable_by_batch_size must be a positive integer, got "
                f"{self.disable_by_batch_size!r}"
            )
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config adaptive must be true or false, got {self.adaptive!r}")

    @classmethod
    def from_user(cls, value) -> SpeculativeConfig | None:
        """From what a user passes: None (off), a dict of vLLM's keys, its JSON text, or a config."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"speculative_config is not valid JSON ({error})") from None
            if value is None:
                return None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object (a dict), got {value!r}")
        known = {field.name for field in fields(cls)}
        for key in value:
            if key in _UNSUPPORTED_VLLM_KEYS:
                raise ValueError(
                    f"speculative_config key {key!r} is not supported (only prompt-lookup drafts, method 'ngram')"
                )
            if key not in known:
                raise ValueError(
                    f"speculative_config has an unknown key {key!r}; the keys are {', '.join(sorted(known))}"
                )
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens (the most tokens drafted per step)")
        return cls(**value)
