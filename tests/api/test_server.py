"""The OpenAI-compatible server as users meet it: a real ``clex-serve`` process on 127.0.0.1 serving the
embedded model, driven by the official ``openai`` client (and by raw HTTP where a client would not send
such a body)."""

import json
import random
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from helpers.servers import running_server

MODEL = "clex-serve-demo"
QUESTION = [{"role": "user", "content": "What does json.dumps do?"}]


@pytest.fixture(scope="module")
def server():
    with running_server("--max-num-seqs", "16") as (url, process):
        yield url


def metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_idle(server: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(server, "clex_serve_kv_blocks_used") == 0 and metric(server, "clex_serve_requests_running") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not become idle")


def test_models_health_version(server, client):
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    assert "version" in httpx.get(f"{server}/version", timeout=10).json()


def test_chat_streamed_equals_whole(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_equals_whole_with_token_prompts_and_echo(client):
    whole = client.completions.create(model=MODEL, prompt="def add(a, b):", temperature=0, max_tokens=16)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="def add(a, b):", temperature=0, max_tokens=16, stream=True
        )
    )
    assert streamed == whole.choices[0].text
    ids = httpx.post(
        f"{client.base_url}".replace("/v1/", "") + "/tokenize", json={"prompt": "def add(a, b):"}, timeout=10
    ).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=16)
    assert by_ids.choices[0].text == whole.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="def add(a, b):", temperature=0, max_tokens=16, echo=True)
    assert echoed.choices[0].text == "def add(a, b):" + whole.choices[0].text
    several = client.completions.create(
        model=MODEL, prompt=["def add(a, b):", [ids]][0:1] + ["import json"], temperature=0, max_tokens=4
    )
    assert [choice.index for choice in several.choices] == [0, 1]


def test_n_seed_and_stop(client):
    two = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, temperature=1.0, max_tokens=12, seed=5)
    assert sorted(choice.index for choice in two.choices) == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, temperature=1.0, max_tokens=12, seed=5)
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]

    full = client.completions.create(model=MODEL, prompt="def add(a, b):", temperature=0, max_tokens=30).choices[0].text
    stop = full.strip()[3:7] if len(full.strip()) > 8 else full.strip()[:2]
    assert stop
    for stream in (False, True):
        if stream:
            text = "".join(
                c.choices[0].text
                for c in client.completions.create(
                    model=MODEL, prompt="def add(a, b):", temperature=0, max_tokens=30, stop=[stop], stream=True
                )
            )
        else:
            text = (
                client.completions.create(
                    model=MODEL, prompt="def add(a, b):", temperature=0, max_tokens=30, stop=[stop]
                )
                .choices[0]
                .text
            )
        assert stop not in text and full.startswith(text)


def test_logprobs(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 3 and item.logprob <= 0 for item in content)
    assert all(item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob for item in content)
    completion = client.completions.create(model=MODEL, prompt="import json", temperature=0, max_tokens=5, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert "".join(logprobs.tokens) == completion.choices[0].text


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    assert error.value.status_code == 400 and error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5000)
    assert error.value.body["code"] == "context_length_exceeded" and "2048" in error.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[10**7], max_tokens=3)
    with pytest.raises(openai.BadRequestError):  # errors inside a stream surface before it starts
        list(
            client.chat.completions.create(
                model=MODEL, messages=QUESTION, stream=True, extra_body={"stop_token_ids": [10**6]}
            )
        )


def _random_body(rng: random.Random) -> tuple[str, object]:
    values = [None, -1, 0, 10**12, -(10**12), 1e309, "x", "", [], {}, [1, "a"], True, 2.5, "NaN", [[]], [{"a": 1}]]
    fields = [
        "messages",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "top_k",
        "min_p",
        "repetition_penalty",
        "stop_token_ids",
        "min_tokens",
        "stream",
        "stream_options",
        "echo",
        "model",
        "max_completion_tokens",
    ]
    route = rng.choice(["/v1/chat/completions", "/v1/completions"])
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    body["max_tokens"] = 4
    for _ in range(rng.randint(1, 3)):
        body[rng.choice(fields)] = rng.choice(values)
    if rng.random() < 0.1:
        body["messages"] = [{"role": rng.choice(["robot", "", 3]), "content": "x"}]
    if rng.random() < 0.05:
        return route, "{not json"
    if rng.random() < 0.05:
        body = {"prompt": "word " * 5000, "messages": [{"role": "user", "content": "word " * 5000}]}
    return route, body


def test_fuzzed_bodies_get_4xx_openai_errors(server):
    rng = random.Random(1234)
    with httpx.Client(base_url=server, timeout=60) as http:
        statuses = []
        for _ in range(300):
            route, body = _random_body(rng)
            if isinstance(body, str):
                response = http.post(route, content=body, headers={"content-type": "application/json"})
            else:
                response = http.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
            statuses.append(response.status_code)
            if response.status_code != 200:
                assert 400 <= response.status_code < 500, (route, body, response.text)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert statuses.count(200) < len(statuses) and any(s == 200 for s in statuses)
    wait_idle(server)


def test_sixteen_streams_half_dropped(server, client):
    """16 concurrent streams; 8 are closed after a few chunks. The other 8 end with their full text, and the
    KV pool is empty afterwards."""
    expected = (
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=64, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .message.content
    )
    results, errors = {}, []

    def worker(index):
        try:
            local = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
            stream = local.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                temperature=0,
                max_tokens=64,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            text, chunks = "", 0
            for chunk in stream:
                chunks += 1
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if index % 2 and chunks == 4:
                    stream.close()  # the client goes away midway
                    break
            results[index] = text
        except Exception as error:  # reported below: a thread must not swallow it
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors and len(results) == 16
    assert all(results[index] == expected for index in range(0, 16, 2))
    wait_idle(server)


def test_api_key_and_full_queue():
    with running_server("--api-key", "secret", "--max-queued-requests", "1", "--max-num-seqs", "1") as (url, _):
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # open without the key
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0, timeout=120)
        assert client.models.list().data[0].id == MODEL
        refused, done = [], []

        def worker():
            try:
                client.completions.create(
                    model=MODEL, prompt="import json", max_tokens=48, extra_body={"ignore_eos": True}
                )
                done.append(1)
            except openai.RateLimitError as error:
                refused.append(error.response.headers.get("retry-after"))

        threads = [threading.Thread(target=worker) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert refused and all(value == "1" for value in refused) and done


def test_sigterm_lets_requests_in_flight_finish():
    with running_server() as (url, process):
        results, errors = [], []

        def worker():
            try:
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
                chunks = list(
                    client.completions.create(
                        model=MODEL, prompt="import json", max_tokens=96, stream=True, extra_body={"ignore_eos": True}
                    )
                )
                results.append(chunks[-1].choices[0].finish_reason)
            except Exception as error:
                errors.append(error)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while metric(url, "clex_serve_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        assert process.wait(timeout=60) == 0
        assert not errors and results == ["length"] * 3


def test_a_model_without_chat_template_answers_chat_with_a_400(tmp_path):
    from helpers.models import model_with_tokenizer

    folder = model_with_tokenizer("llama", tmp_path)
    with running_server("--model", str(folder)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=str(folder), messages=QUESTION)
        assert error.value.body["code"] == "no_chat_template" and "--chat-template" in error.value.body["message"]
        assert client.completions.create(model=str(folder), prompt="CLEX", max_tokens=3).choices[0].text is not None


def test_chat_template_resolution():
    from clex_serve.text.chat_template import VICUNA_TEMPLATE, ZEPHYR_TEMPLATE, resolve_chat_template
    from helpers.models import byte_level_tokenizer

    plain = byte_level_tokenizer()
    assert resolve_chat_template(plain, "DAMO-NLP-SG/CLEX-7B-Chat-16K") == VICUNA_TEMPLATE
    assert resolve_chat_template(plain, "DAMO-NLP-SG/CLEX-Mixtral-8x7B-Chat-32K") == ZEPHYR_TEMPLATE
    assert resolve_chat_template(plain, "DAMO-NLP-SG/CLEX-7B-16K") is None
    assert resolve_chat_template(plain, "any", "zephyr") == ZEPHYR_TEMPLATE
    plain.chat_template = "{{ messages[0]['content'] }}"
    assert resolve_chat_template(plain, "DAMO-NLP-SG/CLEX-7B-Chat-16K") == plain.chat_template
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_chat_template(plain, "any", "/no/such/template.jinja")


def test_serve_flags_fail_in_one_line_and_help_shows_defaults():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "clex_serve.cli.main", "--port", "70000"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "argument --port: must be in [0, 65535], got 70000" in result.stderr
    assert "Traceback" not in result.stderr
    help_text = " ".join(
        subprocess.run(
            [sys.executable, "-m", "clex_serve.cli.main", "--help"], capture_output=True, text=True, timeout=60
        ).stdout.split()
    )
    for flag in (
        "--host",
        "--port",
        "--served-model-name",
        "--chat-template",
        "--api-key",
        "--allowed-origins",
        "--max-queued-requests",
        "--enable-prefix-caching",
        "--no-log-scale",
        "--uvicorn-log-level",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--kv-cache-memory",
    ):
        assert flag in help_text, flag
    assert "(default: 127.0.0.1)" in help_text and "(default: 8000)" in help_text


def test_metrics_and_extensions(server, client):
    completion = client.completions.create(
        model=MODEL,
        prompt="import json",
        max_tokens=4,
        temperature=0,
        extra_body={"prompt_logprobs": 1, "top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2},
    )
    prompt_logprobs = completion.choices[0].model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == completion.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"min_p": 7})
    text = httpx.get(f"{server}/metrics", timeout=10).text
    for name in (
        "clex_serve_requests_running",
        "clex_serve_requests_waiting",
        "clex_serve_kv_blocks_used",
        "clex_serve_preemptions_total",
        "clex_serve_prefix_cache_hit_rate",
        "clex_serve_time_to_first_token_seconds_count",
        "clex_serve_inter_token_latency_seconds_count",
        "clex_serve_e2e_request_latency_seconds_count",
        "clex_serve_prompt_tokens_total",
        "clex_serve_generation_tokens_total",
    ):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", text, re.MULTILINE), name
    assert metric(server, "clex_serve_generation_tokens_total") > 0
    assert re.search(r'^clex_serve_requests_total\{outcome="invalid"\} [1-9]', text, re.MULTILINE)
    response = httpx.get(f"{server}/v1/models", headers={"X-Request-Id": "trace-42"}, timeout=10)
    assert response.headers["x-request-id"] == "trace-42"
