"""Tool-call formats: how a model writes its calls, how they are constrained, and how its output is parsed
back into OpenAI's ``tool_calls`` (whole, or as streamed deltas). Chosen with ``--tool-call-parser``."""

from __future__ import annotations

from clex_serve.api.tool_parsers.hermes import HermesToolParser

TOOL_CALL_PARSERS = {"hermes": HermesToolParser}
DEFAULT_TOOL_CALL_PARSER = "hermes"


def tool_call_parser(name: str):
    try:
        return TOOL_CALL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(TOOL_CALL_PARSERS)}") from None
