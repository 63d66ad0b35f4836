"""``/v1/responses`` through a real server and the official client's ``responses`` API: text and JSON-schema
outputs whole and streamed (the documented event sequence), function tools and their results, usage, and
what the server refuses."""

import json

import httpx
import jsonschema
import pytest

from helpers.json_schemas import SCHEMAS

MODEL = "clex-serve-demo"
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "name": "add", "description": "Add two integers", "parameters": ADD, "strict": True}]


def text_format(name):
    return {"format": {"type": "json_schema", "name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("schema_name", [None, "nested_address"])
def test_create_whole_and_streamed_give_the_same_output(client, schema_name):
    common = dict(
        model=MODEL,
        input=[{"role": "user", "content": "Where do you live?"}],
        instructions="Answer briefly.",
        max_output_tokens=80,
        temperature=0,
    )
    if schema_name:
        common["text"] = text_format(schema_name)
    response = client.responses.create(**common)
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if schema_name:
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), SCHEMAS[schema_name])

    events = list(client.responses.create(**common, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if response.status == "completed" else "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == response.output_text == events[-1].response.output_text


def test_the_stream_helper_assembles_the_final_response(client):
    with client.responses.stream(model=MODEL, input="Hello", max_output_tokens=10, temperature=0) as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(texts) and final.output_text


def test_a_function_call_and_its_result(client):
    response = client.responses.create(
        model=MODEL,
        input="Add 2 and 3.",
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=80,
        temperature=0,
    )
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "add" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), ADD)

    events = list(
        client.responses.create(
            model=MODEL,
            input="Add 2 and 3.",
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=80,
            temperature=0,
            stream=True,
        )
    )
    streamed = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert streamed == done.arguments == call.arguments

    follow_up = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Add 2 and 3."},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "5"},
        ],
        tools=TOOLS,
        max_output_tokens=16,
        temperature=0,
    )
    assert follow_up.output and follow_up.usage.input_tokens > response.usage.input_tokens


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "function", "description": "no name"}]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, "text.format"),
        ({"input": [{"type": "function_call_output", "output": "5"}]}, "input"),
    ],
)
def test_what_cannot_be_served_is_a_400_in_the_openai_shape(server, extra, param):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 4, **extra}
    response = httpx.post(f"{server}/v1/responses", json=body, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
