"""Tool calling through a real server and the official client: forced calls (``required``, a named function)
whose arguments validate against the tool's schema, streamed deltas that reassemble to the same calls, a
conversation that goes on after a tool result, and tool errors as 400s naming the parameter."""

import json

import httpx
import jsonschema
import pytest

MODEL = "clex-serve-demo"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "b": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls, names=("get_weather", "add")):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def streamed_calls(stream) -> tuple[list[dict], str | None, str]:
    """The calls the deltas of choice 0 assemble, its finish reason, and its content."""
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id:
                    assert call["id"] is None, "a call's id comes once, in its first delta"
                    call["id"], call["name"] = delta.id, delta.function.name
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return [calls[index] for index in sorted(calls)], finish, content


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_gives_calls_whose_arguments_validate(client, seed):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0.8,
        seed=seed,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls)


def test_parallel_calls_each_validate(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0.8, seed=4
    )
    choice = reply.choices[0]
    check_calls(choice.message.tool_calls)  # every complete call, also when max_tokens cut a later one


def test_a_named_function_is_the_one_called(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=120,
        temperature=0,
    )
    [call] = reply.choices[0].message.tool_calls
    check_calls([call], names=("add",))


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_deltas_reassemble_to_the_same_call(client, tool_choice):
    common = dict(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    [whole] = client.chat.completions.create(**common).choices[0].message.tool_calls
    calls, finish, content = streamed_calls(client.chat.completions.create(**common, stream=True))
    assert finish == "tool_calls" and content == ""
    [streamed] = calls
    assert streamed["id"].startswith("call_")
    assert (streamed["name"], streamed["arguments"]) == (whole.function.name, whole.function.arguments)


def test_a_conversation_goes_on_after_a_tool_result(client):
    [call] = (
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=120,
            temperature=0,
        )
        .choices[0]
        .message.tool_calls
    )
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=20, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    # The history is in the prompt: a longer history is a longer prompt than the question alone.
    alone = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=1)
    assert reply.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_auto_answers_in_text_when_the_model_writes_no_call(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS, max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    if choice.message.tool_calls:  # the model may call: then the call is valid
        check_calls(choice.message.tool_calls)
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_the_tools_are_in_the_prompt(server):
    def count(body):
        return httpx.post(f"{server}/tokenize", json=body, timeout=30).json()["count"]

    without = count({"messages": QUESTION})
    assert count({"messages": QUESTION, "tools": TOOLS}) > without + 50


@pytest.mark.parametrize(
    "extra,param,says",
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]", "needs a name"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0]",
            "letters, digits",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "give one",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0]",
            "object",
        ),
    ],
)
def test_bad_tools_are_400s_naming_the_parameter(server, extra, param, says):
    response = httpx.post(
        f"{server}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4, **extra}, timeout=60
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and says in error["message"], error
