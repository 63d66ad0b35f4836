"""What a request's output must match: a JSON schema, any JSON object, a regex, one of some strings, a grammar,
or a structural tag (free text with constrained sections, as tool calls use). vLLM's ``StructuredOutputsParams``
names, so that users' scripts carry over; frozen and hashable, so that compiled grammars are cached on it.

Exactly one kind is set. A JSON schema is kept as compact JSON text, its keys in the order given (the
order of ``properties`` is the order the output writes them in, as OpenAI's strict outputs do): the same
schema sent again shares one compiled grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (a dict or its JSON text)
    json_object: bool = False  # any JSON object (OpenAI's response_format {"type": "json_object"})
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # EBNF (GBNF, as llama.cpp's) text
    structural_tag: str | dict | None = None  # xgrammar's structural tag format (a dict or its JSON text)
    # JSON written as ``json.dumps`` writes it (", " and ": " between items, no newlines) rather than with
    # any whitespace. vLLM's flag, with the other default: allowed any whitespace, a model that has seen
    # much indented code spends its budget on indentation (the embedded model did, in every test schema).
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        if self.json is not None:
            object.__setattr__(self, "json", _canonical_json(self.json, "json"))
        if self.structural_tag is not None:
            object.__setattr__(self, "structural_tag", _canonical_json(self.structural_tag, "structural_tag"))
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else tuple(self.choice)
            if not choice or not all(isinstance(item, str) and item for item in choice):
                raise ValueError("structured outputs: choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", choice)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs: {name} must be a non-empty string")
        if not isinstance(self.json_object, bool) or not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured outputs: json_object and disable_any_whitespace are true or false")
        chosen = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(
                f"structured outputs: set exactly one of {', '.join(KINDS)}; got {', '.join(chosen) or 'none'}"
            )

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))


def _canonical_json(value, name: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"structured outputs: {name} is not valid JSON: {error}") from None
    if not isinstance(value, (dict, bool)):
        raise ValueError(f"structured outputs: {name} must be a JSON object, got {type(value).__name__}")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
