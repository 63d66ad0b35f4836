"""The Hermes tool-call format without a server: whole outputs split into content and calls, streamed text
turned into OpenAI's deltas however the text is cut, and the constraint compiling for each tool choice."""

import json
import random

import pytest

from clex_serve.api.protocol_structured import FunctionDefinition
from clex_serve.api.tool_parsers.hermes import HermesToolParser

TEXT = (
    "Let me look.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Paris", "days": [1, 2], "q": "a}\\"b"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>'
)
FUNCTIONS = [
    FunctionDefinition(name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}}),
    FunctionDefinition(name="add", parameters=None),
]


def test_a_whole_output_splits_into_content_and_calls():
    content, calls = HermesToolParser.extract(TEXT)
    assert content == "Let me look."
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("get_weather", {"city": "Paris", "days": [1, 2], "q": 'a}"b'}),
        ("add", {}),
    ]
    assert len({call.id for call in calls}) == 2


def test_text_without_a_valid_call_stays_content():
    for text in ("no calls here", "<tool_call>\nnot json\n</tool_call>", '<tool_call>\n{"name": "f", "argu'):
        assert HermesToolParser.extract(text) == (text, [])


@pytest.mark.parametrize("seed", range(20))
def test_streamed_deltas_reassemble_the_calls_however_the_text_is_cut(seed):
    rng = random.Random(seed)
    stream = HermesToolParser.streamer()
    content, calls, position = "", {}, 0
    while position < len(TEXT):
        piece = TEXT[position : position + rng.randint(1, 9)]
        position += len(piece)
        text, deltas = stream.feed(piece, final=position >= len(TEXT))
        content += text
        for delta in deltas:
            call = calls.setdefault(delta["index"], {"arguments": ""})
            if "id" in delta:
                assert "id" not in call
                call.update(id=delta["id"], name=delta["function"]["name"])
            call["arguments"] += delta["function"]["arguments"]
    assert content.strip() == "Let me look."
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == [
        (call.name, json.loads(call.arguments)) for call in HermesToolParser.extract(TEXT)[1]
    ]


def test_text_that_only_looks_like_the_start_of_a_call_is_released():
    stream = HermesToolParser.streamer()
    assert stream.feed("less than <tool") == ("less than ", [])
    assert stream.feed("bar>", final=True) == ("<toolbar>", [])


def test_a_call_in_another_key_order_arrives_whole():
    stream = HermesToolParser.streamer()
    content, [delta] = stream.feed('<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>', final=True)
    assert content == "" and delta["function"] == {"name": "f", "arguments": '{"a": 1}'}


@pytest.mark.parametrize("choice", ["auto", "required", "add"])
def test_the_constraint_is_a_structural_tag_over_the_tools(choice):
    spec = HermesToolParser.constraint(FUNCTIONS, choice, parallel=True)
    tag = json.loads(spec.structural_tag)["format"]
    begins = [item["begin"] for item in tag["tags"]]
    assert all(begin.startswith('<tool_call>\n{"name": ') for begin in begins)
    assert len(begins) == (1 if choice == "add" else 2)
    assert tag["type"] == ("triggered_tags" if choice == "auto" else "tags_with_separator")


TOOL_TEMPLATE = (
    "{% for tool in tools %}[tool {{ tool.function.name }}]{% endfor %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for call in m.tool_calls or [] %}[call {{ call.function.name }} {{ call.function.arguments.city }}]{% endfor %}"
    "{% endfor %}"
)


def _conversation(template):
    from clex_serve.api.chat_tools import ChatTools
    from clex_serve.api.protocol import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        }
    )
    return ChatTools.of(body, HermesToolParser()).conversation(body.messages, template)


def test_a_template_that_handles_tools_gets_them_and_the_history_in_transformers_shape():
    from jinja2 import Template

    messages, tools = _conversation(TOOL_TEMPLATE)
    assert tools == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # an object, as templates expect
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    rendered = Template(TOOL_TEMPLATE).render(messages=messages, tools=tools)
    assert "[tool get_weather]" in rendered and "[call get_weather Paris]" in rendered and "<tool>sunny" in rendered


def test_a_template_without_tools_gets_the_conversation_in_the_parsers_format():
    from clex_serve.text.chat_template import VICUNA_TEMPLATE

    messages, tools = _conversation(VICUNA_TEMPLATE)
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "<tools>" in messages[0]["content"] and "get_weather" in messages[0]["content"]
    assert (
        messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
