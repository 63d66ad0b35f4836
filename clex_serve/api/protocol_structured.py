"""The request fields that constrain what the model writes: OpenAI's ``response_format`` and ``tools`` /
``tool_choice``, and vLLM's ``structured_outputs`` (with its older ``guided_*`` names), as pydantic models.

Each turns into the engine's ``StructuredOutputsParams``; which field asked is kept with it, so that a
constraint the grammar compiler refuses is a 400 naming that field.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clex_serve.structured_outputs import StructuredOutputsParams

# OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class JsonSchemaFormat(_Model):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # structural_tag: xgrammar's format (as vLLM takes it): {"type": "structural_tag", "format": {...}}
    format: dict[str, Any] | None = None

    def to_params(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise ValueError('response_format: type "json_schema" needs json_schema.schema')
            return StructuredOutputsParams(json=self.json_schema.schema_)
        if self.format is None:
            raise ValueError('response_format: type "structural_tag" needs format')
        return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": self.format})


class StructuredOutputsRequest(_Model):
    """vLLM's ``structured_outputs`` extension: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None
    disable_any_whitespace: bool | None = None

    def to_params(self) -> StructuredOutputsParams:
        options = {} if self.disable_any_whitespace is None else {"disable_any_whitespace": self.disable_any_whitespace}
        return StructuredOutputsParams(
            json=self.json_,
            regex=self.regex,
            choice=tuple(self.choice) if self.choice is not None else None,
            grammar=self.grammar,
            json_object=bool(self.json_object),
            structural_tag=self.structural_tag,
            **options,
        )


class FunctionDefinition(_Model):
    name: str | None = Field(None, description="required; letters, digits, _ and -, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tools(tools: list[Tool], param: str = "tools", name_of=lambda tool: tool.function) -> None:
    """Every tool has a valid, unique name and an object schema for its parameters (ValueError naming the
    place otherwise)."""
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"{param}: at most {MAX_TOOLS} tools, got {len(tools)}")
    seen = set()
    for index, tool in enumerate(tools):
        function = name_of(tool)
        where = f"{param}[{index}]"
        if not function.name:
            raise ValueError(f"{where}: a function tool needs a name")
        if not FUNCTION_NAME.match(function.name):
            raise ValueError(f"{where}: the name {function.name!r} must be 1-64 letters, digits, '_' or '-'")
        if function.name in seen:
            raise ValueError(f"{where}: a second tool named {function.name!r}")
        seen.add(function.name)
        if function.parameters is not None and function.parameters.get("type", "object") != "object":
            raise ValueError(f"{where}: parameters must be a JSON schema of an object")


def tool_arguments_json(arguments: str | dict | None) -> dict | str:
    """A history tool call's arguments as templates take them: a dict where the JSON text parses."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return arguments or ""
    return value if isinstance(value, dict) else arguments
