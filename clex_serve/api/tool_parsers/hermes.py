"""Hermes-style tool calls (NousResearch Hermes 2 Pro, Qwen 2.5 and later): each call is one JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>`` lines.

The format for models whose chat template knows no tools of its own (the embedded model's Vicuna template,
the CLEX chat models'): the tools are described in the system message in this format, earlier calls and
their results are written into the conversation in it, and the output is constrained to it:

- ``tool_choice: "required"``: one or more calls and nothing else (one, with ``parallel_tool_calls: false``);
- a named function: exactly one call of it;
- ``"auto"``: free text, where a ``<tool_call>`` the model starts must be a valid call of a tool given.

In every case each call's arguments are held to its function's parameter schema, so that the calls parse.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from clex_serve.structured_outputs import StructuredOutputsParams

BEGIN, END = "<tool_call>", "</tool_call>"
CALL_PREFIX = BEGIN + '\n{"name": '
_CALL = re.compile(re.escape(BEGIN) + r"\s*(.*?)\s*" + re.escape(END), re.DOTALL)

SYSTEM_PROMPT = (
    "You may call functions to help with the user's request. The functions are described in JSON Schema "
    "between <tools> and </tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, write a JSON object with its name and arguments between <tool_call> and "
    "</tool_call>, one call per block:\n"
    '<tool_call>\n{{"name": "function name", "arguments": {{"argument": "value"}}}}\n</tool_call>\n'
    "The results come back between <tool_response> and </tool_response>."
)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or new_call_id()

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def call_text(name: str, arguments) -> str:
    """One call as the model writes it (for the history of a conversation)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            pass
    return f"{BEGIN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{END}"


def parameters_schema(function) -> dict:
    return function.parameters or {"type": "object", "properties": {}}


def compact_json_grammar(function) -> str:
    """The EBNF grammar of the function's arguments, written as ``json.dumps`` writes JSON: with any
    whitespace between tokens a small model writes newlines until its budget is spent (the embedded model
    did), and the structural tag's own JSON content allows whitespace."""
    import xgrammar

    try:
        return str(xgrammar.Grammar.from_json_schema(json.dumps(parameters_schema(function)), any_whitespace=False))
    except Exception as error:  # xgrammar raises RuntimeError and its own types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"tools: the parameters of {function.name!r} are not a usable JSON schema: {reason}") from None


class HermesToolParser:
    name = "hermes"

    # ------------------------------------------------------------------ prompt

    @staticmethod
    def system_prompt(functions) -> str:
        described = [
            {
                "type": "function",
                "function": {
                    "name": f.name,
                    "description": f.description or "",
                    "parameters": parameters_schema(f),
                },
            }
            for f in functions
        ]
        return SYSTEM_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in described))

    call_text = staticmethod(call_text)

    @staticmethod
    def tool_result_text(content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    # ------------------------------------------------------------------ constraint

    @staticmethod
    def constraint(functions, choice: str, parallel: bool) -> StructuredOutputsParams | None:
        """The structural tag that holds the output to calls of ``functions``: ``choice`` is "auto",
        "required", or the name of the one function to call."""
        if choice not in ("auto", "required"):
            functions = [f for f in functions if f.name == choice]
        tags = [
            {
                "type": "tag",
                "begin": f"{CALL_PREFIX}{json.dumps(f.name)}, " + '"arguments": ',
                "content": {"type": "grammar", "grammar": compact_json_grammar(f)},
                "end": "}\n" + END,
            }
            for f in functions
        ]
        if choice == "auto":
            format_ = {"type": "triggered_tags", "triggers": [BEGIN], "tags": tags, "stop_after_first": not parallel}
        else:
            format_ = {
                "type": "tags_with_separator",
                "tags": tags,
                "separator": "\n",
                "at_least_one": True,
                "stop_after_first": not parallel or choice != "required",
            }
        return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": format_})

    # ------------------------------------------------------------------ parsing

    @staticmethod
    def extract(text: str) -> tuple[str | None, list[ToolCall]]:
        """The message content (the text outside calls; None when empty) and the calls, in order. A block
        that is not a call (not JSON, no name) stays in the content."""
        calls, kept, last = [], [], 0
        for match in _CALL.finditer(text):
            call = parse_call(match.group(1))
            if call is None:
                continue
            kept.append(text[last : match.start()])
            last = match.end()
            calls.append(call)
        kept.append(text[last:])
        content = "".join(kept).strip() if calls else text
        return (content or None), calls

    @staticmethod
    def streamer():
        from clex_serve.api.tool_parsers.hermes_stream import HermesToolStream

        return HermesToolStream()


def parse_call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))
