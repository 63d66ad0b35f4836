"""Structured outputs through a real server and the official client: JSON schemas (whole, streamed, n=2),
the client's pydantic parsing, vLLM's regex / choice / grammar, and the limits (a cut is "length", a bad
constraint is a 400 naming its field)."""

import json
import re

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from helpers.json_schemas import SCHEMAS

MODEL = "clex-serve-demo"


def ask(name: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with {name.replace('_', ' ')} as JSON."}]


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_choice_validates_against_the_schema_whole_and_streamed(client, name):
    schema = SCHEMAS[name]
    common = dict(
        model=MODEL,
        messages=ask(name),
        n=2,
        temperature=0.9,
        seed=11,
        max_tokens=200,
        response_format=json_schema_format(name, schema),
    )
    reply = client.chat.completions.create(**common)
    assert len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)

    streamed = {0: "", 1: ""}
    finish = {}
    for chunk in client.chat.completions.create(**common, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "stop", 1: "stop"}
    for text in streamed.values():
        jsonschema.validate(json.loads(text), schema)
    # The same seed samples the same tokens streamed or not.
    assert sorted(streamed.values()) == sorted(choice.message.content for choice in reply.choices)


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    address: Address


def test_the_clients_pydantic_parse_gets_a_parsed_model(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=ask("a person"), response_format=Person, max_tokens=200, temperature=0
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Person)
    assert 0 <= message.parsed.age <= 120 and re.fullmatch(r"[0-9]{5}", message.parsed.address.zip_code)


def test_json_object_mode_gives_an_object(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ask("any object"),
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0.7,
        seed=5,
        frequency_penalty=0.5,  # the free-form object of a small model repeats keys otherwise
    )
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: a prefix of an object
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_regex_choice_and_grammar(client, route):
    cases = [
        ({"regex": r"[0-9]{3}-[a-z]{2,6}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,6}", text)),
        ({"choice": ["alpha", "beta", "gamma delta"]}, lambda text: text in ("alpha", "beta", "gamma delta")),
        (
            {"grammar": 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z]{1,5}'},
            lambda text: re.fullmatch(r"\([a-z]{1,5}(,[a-z]{1,5})*\)", text),
        ),
    ]
    for constraint, check in cases:
        for seed in (1, 2):
            extra = {"structured_outputs": constraint}
            if route == "chat":
                reply = client.chat.completions.create(
                    model=MODEL, messages=ask("it"), max_tokens=60, temperature=0.8, seed=seed, extra_body=extra
                )
                text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
            else:
                reply = client.completions.create(
                    model=MODEL, prompt="Answer:", max_tokens=60, temperature=0.8, seed=seed, extra_body=extra
                )
                text, finish = reply.choices[0].text, reply.choices[0].finish_reason
            assert finish == "stop" and check(text), (constraint, text)


def test_vllms_older_guided_names_still_work(client):
    reply = client.completions.create(
        model=MODEL, prompt="Pick:", max_tokens=10, extra_body={"guided_choice": ["left", "right"]}
    )
    assert reply.choices[0].text in ("left", "right")


def test_a_cut_constrained_output_ends_with_length_and_logprobs_come_with_it(client):
    schema = SCHEMAS["many_required"]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ask("a user"),
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        stop=["never-seen"],
        response_format=json_schema_format("user", schema),
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert len(choice.logprobs.content) == 5 and all(entry.logprob <= 0 for entry in choice.logprobs.content)


def test_a_stop_string_inside_the_structure_ends_it_there(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ask("a person"),
        max_tokens=100,
        temperature=0,
        stop=['"age"'],
        response_format=json_schema_format("person", SCHEMAS["person"]),
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content.startswith('{"name": ')
    assert '"age"' not in choice.message.content


@pytest.mark.parametrize(
    "extra,param,says",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
            "nonsense",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"grammar": "root ::= missing_rule"}}, "structured_outputs", "missing_rule"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        (
            {"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}},
            "response_format",
            "give one",
        ),
    ],
)
def test_a_constraint_that_cannot_be_compiled_is_a_400_naming_its_field(server, extra, param, says):
    response = httpx.post(
        f"{server}/v1/chat/completions",
        json={"messages": ask("x"), "max_tokens": 4, **extra},
        timeout=60,
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and says in error["message"], error
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
