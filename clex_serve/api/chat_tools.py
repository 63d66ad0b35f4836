"""Tool calling in a chat request: the conversation as the chat template takes it, the constraint on the
output, and the output read back as OpenAI's ``tool_calls``.

A template that handles tools itself (its source uses ``tools``, as Hermes', Qwen's and Llama 3.1's do) gets
them through ``apply_chat_template(tools=...)`` and the history in transformers' shape (assistant
``tool_calls`` with their arguments as objects, ``tool`` messages). One that does not (Vicuna, Zephyr) gets
the conversation written in the parser's format: the tools described in the system message, earlier calls
in the assistant's text, results as user turns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clex_serve.api.protocol import ChatCompletionRequest, ChatMessage
from clex_serve.api.protocol_structured import FunctionDefinition, tool_arguments_json
from clex_serve.structured_outputs import StructuredOutputsParams

_USES_TOOLS = re.compile(r"\btools\b")


def template_handles_tools(template: str | None) -> bool:
    return bool(template and _USES_TOOLS.search(template))


@dataclass
class ChatTools:
    functions: list[FunctionDefinition]
    choice: str  # "none", "auto", "required", or the name of the one function to call
    parallel: bool
    parser: object  # a tool-call parser (tool_parsers)

    @classmethod
    def of(cls, body: ChatCompletionRequest, parser) -> ChatTools:
        """ValueError (naming the parameter) for tools or a tool_choice that cannot be met."""
        choice = body.tool_choice_name()
        functions = [tool.function for tool in body.tools or []] if choice != "none" else []
        return cls(functions, choice, body.parallel_tool_calls is not False, parser)

    @property
    def active(self) -> bool:
        """Whether the output is read for tool calls."""
        return bool(self.functions)

    @property
    def forced(self) -> bool:
        """Whether the output must be tool calls (``required`` or a named function)."""
        return self.active and self.choice != "auto"

    def constraint(self) -> StructuredOutputsParams | None:
        if not self.active:
            return None
        return self.parser.constraint(self.functions, self.choice, self.parallel)

    def conversation(self, messages: list[ChatMessage], template: str | None) -> tuple[list[dict], list | None]:
        """The messages and the ``tools`` argument for the chat template."""
        if template_handles_tools(template):
            tools = [{"type": "function", "function": _function_json(f)} for f in self.functions]
            return [_transformers_message(message) for message in messages], tools
        return self._written_in_format(messages), None

    def _written_in_format(self, messages: list[ChatMessage]) -> list[dict]:
        conversation = []
        for message in messages:
            role = "system" if message.role == "developer" else message.role
            text = message.text()
            if role == "tool":
                conversation.append({"role": "user", "content": self.parser.tool_result_text(text)})
                continue
            if message.tool_calls:
                calls = [
                    self.parser.call_text(call.function.name, call.function.arguments) for call in message.tool_calls
                ]
                text = "\n".join(([text] if text else []) + calls)
            conversation.append({"role": role, "content": text})
        if self.functions:
            described = self.parser.system_prompt(self.functions)
            if conversation and conversation[0]["role"] == "system":
                conversation[0] = {"role": "system", "content": conversation[0]["content"] + "\n\n" + described}
            else:
                conversation.insert(0, {"role": "system", "content": described})
        return conversation


def _function_json(function: FunctionDefinition) -> dict:
    value = {"name": function.name, "parameters": function.parameters or {"type": "object", "properties": {}}}
    if function.description:
        value["description"] = function.description
    return value


def _transformers_message(message: ChatMessage) -> dict:
    result = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        result["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": tool_arguments_json(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        result["name"] = message.name
    return result
