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
