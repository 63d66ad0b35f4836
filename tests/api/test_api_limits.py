"""The server holds against any client: every request's work is bounded before admission, parameters the
server does not implement are refused by name, and each refusal says in plain words what is wrong. A real
``clex-serve`` process on 127.0.0.1, driven by the official ``openai`` client and by raw HTTP."""

import json
import signal
import time

import httpx
import openai
import pytest

from helpers.servers import running_server

MODEL = "clex-serve-demo"
QUESTION = [{"role": "user", "content": "What does json.dumps do?"}]


@pytest.fixture(scope="module")
def served():
    with running_server("--dtype", "float32") as (url, process):
        yield url, process


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def post(server: str, route: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server}{route}", content=content, timeout=60, headers={"content-type": "application/json", **headers}
    )


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_huge_n_and_huge_bodies_are_refused_at_once_and_cost_no_memory(served):
    server, process = served
    post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 2})  # warm: what a first request allocates
    before = resident_bytes(process.pid)

    started = time.monotonic()
    response = post(server, "/v1/completions", {"prompt": "hello", "n": 10**12, "max_tokens": 4})
    assert time.monotonic() - started < 2
    assert response.status_code == 400 and error_of(response)["param"] == "n"

    huge = b'{"prompt": "' + b"a" * (50 * 1024 * 1024) + b'"}'
    started = time.monotonic()
    response = post(server, "/v1/completions", huge)
    assert time.monotonic() - started < 2
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the body is counted as it arrives
        for start in range(0, len(huge), 1 << 20):
            yield huge[start : start + (1 << 20)]

    started = time.monotonic()
    response = httpx.post(
        f"{server}/v1/completions", content=chunks(), timeout=60, headers={"content-type": "application/json"}
    )
    assert time.monotonic() - started < 2
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"

    assert resident_bytes(process.pid) - before < 100 * 1024 * 1024
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    answer = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


def test_a_prompt_too_long_in_characters_is_refused_before_tokenizing(server):
    # Under the body limit, but more characters than 2,048 tokens of this vocabulary can hold.
    response = post(server, "/v1/completions", {"prompt": "word " * 150_000, "max_tokens": 2})
    error = error_of(response)
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt" and "at least" in error["message"] and "2048" in error["message"]
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 150_000}]})
    assert chat.status_code == 400 and error_of(chat)["param"] == "messages"


@pytest.mark.parametrize(
    "route,extra,param",
    [
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/responses", {"previous_response_id": "resp_1"}, "previous_response_id"),
        ("/v1/responses", {"background": True}, "background"),
    ],
)
def test_unimplemented_parameters_are_refused_by_name(server, route, extra, param):
    body = {"messages": QUESTION, "max_tokens": 2} if "chat" in route else {"prompt": "hello", "max_tokens": 2}
    if "responses" in route:
        body = {"input": "hello", "max_output_tokens": 2}
    response = post(server, route, {**body, **extra})
    error = error_of(response)
    assert response.status_code == 400 and error["param"] == param and error["code"] == "unsupported_parameter"
    assert "not supported" in error["message"]


def test_no_op_values_of_those_parameters_are_accepted(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=2, tool_choice="none", response_format={"type": "text"}
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=2, best_of=2).choices


@pytest.mark.parametrize(
    "route,body,param,says",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
            "seed",
            "less than or equal to",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 100},
            "top_logprobs",
            "20",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ]
            },
            "messages[0].content[0].type",
            "'image_url' content parts are not supported",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "function", "content": "42", "name": "f"}]},
            "messages[0].role",
            "deprecated",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "\ud800"}]},
            "messages[0].content",
            "lone surrogate",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "a valid string or a valid list",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream": 0},
            "stream",
            "valid boolean",
        ),
        ("/v1/completions", {"prompt": "\udfff"}, "prompt", "lone surrogate"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias.5", "less than or equal to 100"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"999999": 1}}, "logit_bias", "not in the vocabulary"),
        ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 33}, "stop", "at most 32"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "only with echo"),
        ("/tokenize", {"messages": []}, "messages", "at least 1"),
        ("/v1/completions", [1, 2], None, "the body must be a JSON object"),
    ],
)
def test_messages_name_the_parameter_and_say_what_is_wrong(server, route, body, param, says):
    response = post(server, route, json.dumps(body))  # lone surrogates travel as JSON escapes
    error = error_of(response)
    assert response.status_code == 400, response.text
    assert error["param"] == param and says in error["message"], error


def test_context_overflow_has_one_shape(server):
    chat = error_of(post(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 5000}))
    completion = error_of(post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 5000}))
    unasked = error_of(post(server, "/v1/completions", {"prompt": [5] * 2048}))
    for error, param in ((chat, "messages"), (completion, "prompt"), (unasked, "prompt")):
        assert error["code"] == "context_length_exceeded" and error["param"] == param
        assert "maximum context length is 2048 tokens" in error["message"]
    assert "5000 in the completion" in chat["message"] and "in the messages" in chat["message"]
    assert "5000 in the completion" in completion["message"] and "in the prompt" in completion["message"]
    assert "2048 tokens, which leaves no room" in unasked["message"]


def test_logit_bias_steers_greedy_decoding(server, client):
    def tokens(text):
        return post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]

    prompt = "def add(a, b):"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    greedy_id = tokens(plain.choices[0].text)[0]
    forced_id = tokens(" json")[0]
    assert forced_id != greedy_id
    forced = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logit_bias={str(forced_id): 100},
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].text == post(server, "/detokenize", {"tokens": [forced_id] * 6}).json()["prompt"]
    banned = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(greedy_id): -100}
    )
    assert tokens(banned.choices[0].text)[0] != greedy_id


def test_model_retrieve_and_tokenizer_info(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    info = httpx.get(f"{server}/tokenizer_info", timeout=10).json()
    assert info["vocab_size"] == 4096 and info["model_max_length"] == 2048 and info["eos_token"] == "</s>"
    assert info["chat_template"]


def test_a_method_not_allowed_says_which_are_and_the_body_limit_is_a_flag():
    with running_server("--max-request-body-bytes", "4096") as (url, _):
        response = httpx.delete(f"{url}/v1/completions", timeout=10)
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert error_of(response)["type"] == "invalid_request_error"
        small = post(url, "/v1/completions", {"prompt": "a" * 3000, "max_tokens": 1})
        assert small.status_code in (200, 400)  # under the limit: read (and judged on its merits)
        large = post(url, "/v1/completions", {"prompt": "a" * 5000, "max_tokens": 1})
        assert large.status_code == 413 and "4096 bytes" in error_of(large)["message"]


def test_unknown_fields_are_ignored_with_one_log_line_and_aborted_streams_log_499():
    with running_server("--uvicorn-log-level", "warning") as (url, process):
        reply = post(
            url,
            "/v1/completions",
            {"prompt": "hi", "max_tokens": 2, "frobnicate": 1, "store": True},
            **{"x-request-id": "unknown-fields"},
        )
        assert reply.status_code == 200
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            timeout=60,
            json={"prompt": "hi", "max_tokens": 2000, "stream": True, "ignore_eos": True},
            headers={"x-request-id": "goes-away"},
        ) as stream:
            for _ in zip(range(3), stream.iter_lines()):
                pass
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=60)[1]
    lines = [line for line in log.splitlines() if "unknown-fields" in line and "ignoring" in line]
    assert len(lines) == 1 and "frobnicate" in lines[0] and "store" not in lines[0]
    assert any("goes-away" in line and "status 499" in line for line in log.splitlines()), log[-3000:]
