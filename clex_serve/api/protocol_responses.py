"""``POST /v1/responses``'s request body, the part vLLM serves, and its translation into a chat request.

A response is a chat completion in another shape: ``input`` (a string, or message and function-call items)
and ``instructions`` become the messages, ``text.format`` the response format, the flat function tools the
chat API's nested ones. The server keeps no responses, so ``previous_response_id`` (which needs the stored
conversation) and ``background`` are refused with a 400 that says what to send instead; ``store`` is
accepted and has no effect.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from clex_serve.api import limits
from clex_serve.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatToolCall,
    OpenAIModel,
    Text,
    ToolCallFunction,
)
from clex_serve.api.protocol_structured import MAX_TOOLS, FunctionDefinition, NamedFunction, NamedToolChoice, Tool


class InputContent(OpenAIModel):
    type: Literal["input_text", "output_text", "text", "refusal"]
    text: Text | None = None
    refusal: str | None = None


class InputItem(OpenAIModel):
    """A message (``role`` and ``content``), a function call the model made, or its output."""

    type: Literal["message", "function_call", "function_call_output"] | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Text | list[InputContent] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: Text | None = None
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or part.refusal or "" for part in self.content or [])


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = Field("response", max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOptions(OpenAIModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class FunctionTool(OpenAIModel):
    type: Literal["function"]
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: Text | list[InputItem] = Field(description="a string, or message and function-call items")
    instructions: Text | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = Field(None, description="refused: this server keeps no responses")
    background: bool | None = Field(None, description="refused when true")
    seed: int | None = Field(None, ge=limits.SEED_MIN, le=limits.SEED_MAX)
    user: str | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.previous_response_id is not None:
            return "previous_response_id", (
                "previous_response_id is not supported: this server keeps no responses; send the whole "
                "conversation in input (earlier output items included)"
            )
        if self.background:
            return "background", "background responses are not supported; leave background unset"
        return None

    def unknown_fields(self) -> list[str]:
        return sorted(name for name in (self.model_extra or {}) if name not in ("service_tier", "prompt_cache_key"))

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (ValueError naming the input item that is malformed)."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        items = [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for index, item in enumerate(items):
            messages.extend(_item_messages(item, index, messages))
        if not messages:
            raise ValueError("input: needs at least one message")
        response_format = None
        text_format = self.text.format if self.text else None
        if text_format is not None and text_format.type != "text":
            if text_format.type == "json_schema" and text_format.schema_ is None:
                raise ValueError('text.format: type "json_schema" needs a schema')
            response_format = {"type": text_format.type}
            if text_format.type == "json_schema":
                response_format["json_schema"] = {
                    "name": text_format.name,
                    "schema": text_format.schema_,
                    "strict": text_format.strict,
                }
        tool_choice = self.tool_choice
        if isinstance(tool_choice, FunctionChoice):
            tool_choice = NamedToolChoice(function=NamedFunction(name=tool_choice.name))
        return ChatCompletionRequest.model_validate(
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": self.max_output_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "seed": self.seed,
                "tools": [_chat_tool(tool) for tool in self.tools] if self.tools else None,
                "tool_choice": tool_choice,
                "parallel_tool_calls": self.parallel_tool_calls,
                "response_format": response_format,
            },
            strict=False,
        )


def _chat_tool(tool: FunctionTool) -> Tool:
    return Tool(
        function=FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
        )
    )


def _item_messages(item: InputItem, index: int, earlier: list[ChatMessage]) -> list[ChatMessage]:
    where = f"input[{index}]"
    kind = item.type or ("message" if item.role else None)
    if kind == "message":
        if item.role is None:
            raise ValueError(f"{where}: a message needs a role")
        return [ChatMessage(role=item.role, content=item.text())]
    if kind == "function_call":
        if not item.name or item.call_id is None:
            raise ValueError(f"{where}: a function_call item needs name and call_id")
        call = ChatToolCall(id=item.call_id, function=ToolCallFunction(name=item.name, arguments=item.arguments or ""))
        last = earlier[-1] if earlier else None
        if last is not None and last.role == "assistant" and last.tool_calls is not None:
            last.tool_calls.append(call)  # parallel calls of one turn
            return []
        return [ChatMessage(role="assistant", content=None, tool_calls=[call])]
    if kind == "function_call_output":
        if item.call_id is None:
            raise ValueError(f"{where}: a function_call_output item needs call_id")
        return [ChatMessage(role="tool", content=item.output or "", tool_call_id=item.call_id)]
    raise ValueError(f"{where}: an item is a message (role and content), a function_call or a function_call_output")
