"""clex-serve on Ray Serve as users meet it: ``clex-serve --ray-replicas 2`` on a local Ray cluster
(127.0.0.1, no dashboard) serving the embedded model through Ray's HTTP proxy, driven by the official
``openai`` client.

The single server's conformance tests run here unchanged, against the proxy (their ``metric`` helper reads
the sum over replicas, the figure a single server reports). Then what only replicas have: a conversation
stays on one replica while its CLEX scale holds (the replica's prefix-cache hits show why) and moves to the
least loaded one when its scale changes; a replica killed mid-stream ends its stream with an error within
seconds, new requests go to the other, and Ray brings a new one up; the API key and the 429 of a full
queue through Ray's own queue.
"""

import re
import threading
import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from api import test_server as conformance  # noqa: E402
from api.test_server import (  # noqa: E402, F401 - collected here, against the fixtures below
    test_chat_streamed_equals_whole,
    test_completions_streamed_equals_whole_with_token_prompts_and_echo,
    test_errors_are_openai_errors,
    test_fuzzed_bodies_get_4xx_openai_errors,
    test_logprobs,
    test_models_health_version,
    test_n_seed_and_stop,
    test_sixteen_streams_half_dropped,
)

from helpers.servers import running_server  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "clex-serve-demo"
REPLICA = "x-clex-replica"
L0 = 128  # the embedded model's base window: the scale steps up every 128 tokens


def replica_metric(server: str, name: str) -> dict[str, float]:
    """``name`` per replica, from the proxy's /metrics (every replica's series, labelled)."""
    text = httpx.get(f"{server}/metrics", timeout=30).text
    values = {}
    for replica, value in re.findall(rf'^{name}\{{replica="([^"]+)"\}} ([0-9.e+-]+)$', text, re.MULTILINE):
        values[replica] = float(value)
    return values


def summed_metric(server: str, name: str) -> float:
    values = replica_metric(server, name)
    assert values, f"{name} not in /metrics"
    return sum(values.values())


@pytest.fixture(scope="module")
def server():
    with running_server(
        "--ray-replicas",
        "2",
        "--kv-cache-memory",
        "0.05",
        "--max-num-seqs",
        "16",
        startup_timeout=240,
    ) as (url, _):
        yield url


@pytest.fixture(scope="module", autouse=True)
def replicas_summed(server):
    """The conformance tests' ``metric`` reads one server; here it reads the sum over the replicas."""
    patch = pytest.MonkeyPatch()
    patch.setattr(conformance, "metric", summed_metric)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def ray_driver(server):
    """This process as a second driver of the server's cluster, to kill replicas and deploy beside it."""
    ray.init(address="auto", namespace="serve", log_to_driver=False)
    yield
    ray.shutdown()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def chat(server: str, messages: list[dict], **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, **extra}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def prompt_tokens(server: str, messages: list[dict]) -> int:
    return httpx.post(f"{server}/tokenize", json={"messages": messages}, timeout=30).json()["count"]


def test_every_response_names_its_replica_and_metrics_cover_both(server, client):
    response = httpx.get(f"{server}/v1/models", headers={"X-Request-Id": "trace-42"}, timeout=30)
    assert response.headers["x-request-id"] == "trace-42" and response.headers[REPLICA]
    for _ in range(2):
        client.completions.create(model=MODEL, prompt="import json", max_tokens=2)
    used = wait_for(lambda: len(replica_metric(server, "clex_serve_kv_blocks_total")) == 2, 30, "both replicas")
    assert used
    text = httpx.get(f"{server}/metrics", timeout=30).text
    assert text.count("# TYPE clex_serve_kv_blocks_total gauge") == 1  # one family, both replicas' samples


def _turns(server: str) -> list[list[dict]]:
    """A conversation whose every turn resends the history: four turns inside the first scale (t = 1),
    then two at t = 2."""
    history = [{"role": "system", "content": "You answer questions about the Python standard library."}]
    topics = ["json", "os", "sys", "re", "math", "time", "random", "string"]
    turns = []
    for topic in topics:
        history = history + [{"role": "user", "content": f"What does the {topic} module do, in short?"}]
        turns.append(history)
        history = history + [{"role": "assistant", "content": f"The {topic} module has functions for {topic}."}]
        if prompt_tokens(server, history) > 2 * L0 - 40:
            break
    return turns


def test_a_conversation_stays_while_its_scale_holds_and_moves_to_the_least_loaded_when_it_changes(server):
    turns = _turns(server)
    scales = [-(-prompt_tokens(server, turn) // L0) for turn in turns]
    first_t2 = scales.index(2)
    assert scales[0] == 1 and first_t2 >= 3 and len(scales) > first_t2 + 1, scales

    hits_before = replica_metric(server, "clex_serve_prefix_cache_hit_tokens_total")
    served = [chat(server, turn).headers[REPLICA] for turn in turns[:first_t2]]
    home = served[0]
    assert served == [home] * first_t2  # the scale held: every turn went where its prefix is
    hits = replica_metric(server, "clex_serve_prefix_cache_hit_tokens_total")
    assert hits[home] > hits_before.get(home, 0)  # ... and was served from it

    # Load the conversation's replica with a long stream (pinned to it), then cross the scale boundary:
    # the cached prefix is at t = 1, the new prompt runs at t = 2, so nothing is reusable anywhere and the
    # turn goes to the least loaded replica.
    stream = httpx.stream(
        "POST",
        f"{server}/v1/completions",
        json={"model": MODEL, "prompt": "import os", "max_tokens": 1500, "stream": True, "ignore_eos": True},
        headers={REPLICA: home},
        timeout=120,
    )
    with stream as response:
        assert response.headers[REPLICA] == home
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        moved = chat(server, turns[first_t2]).headers[REPLICA]
        assert moved != home
        hits_there = replica_metric(server, "clex_serve_prefix_cache_hit_tokens_total").get(moved, 0)
        # The next turn, still at t = 2, follows the prefix to its new replica, and hits there.
        assert chat(server, turns[first_t2 + 1]).headers[REPLICA] == moved
        assert replica_metric(server, "clex_serve_prefix_cache_hit_tokens_total")[moved] > hits_there
    conformance.wait_idle(server)


def test_a_killed_replica_ends_its_streams_with_an_error_and_comes_back(server, ray_driver):
    from ray.serve._private.common import DeploymentID, ReplicaID

    before = set(replica_metric(server, "clex_serve_kv_blocks_total"))
    assert len(before) == 2
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.completions.with_raw_response.create(
        model=MODEL, prompt="import sys", max_tokens=1800, stream=True, extra_body={"ignore_eos": True}
    )
    victim = stream.headers[REPLICA]
    chunks = iter(stream.parse())
    next(chunks)
    actor_name = ReplicaID(victim, DeploymentID("EngineReplica", "clex-serve")).to_full_id_str()
    actor = ray.get_actor(actor_name, namespace="serve")
    killed = time.monotonic()
    ray.kill(actor, no_restart=True)
    with pytest.raises(openai.APIError) as error:
        for _ in chunks:
            pass
    assert time.monotonic() - killed < 10
    assert "replica" in str(error.value)

    survivor = (before - {victim}).pop()
    for _ in range(3):  # new requests go to the replica that is left
        response = httpx.post(
            f"{server}/v1/completions", json={"model": MODEL, "prompt": "import re", "max_tokens": 2}, timeout=60
        )
        assert response.status_code == 200 and response.headers[REPLICA] == survivor

    # Ray starts a replacement (a new replica id), and both serve again.
    def two_replicas():
        ids = set(replica_metric(server, "clex_serve_kv_blocks_total"))
        return ids if len(ids) == 2 and ids != before else None

    after = wait_for(two_replicas, 120, "a replacement replica")
    assert victim not in after and survivor in after


def test_api_key_and_a_full_queue_through_rays_queue(server, ray_driver):
    from clex_serve.deploy.ray import build_app

    app = build_app(
        {
            "num_replicas": 1,
            "num_cpus_per_replica": 0,
            "api_key": "secret",
            "max_queued_requests": 1,
            "max_num_seqs": 1,
            "kv_cache_memory": 0.05,
            "device": "cpu",
        }
    )
    serve.run(app, name="keyed", route_prefix="/keyed")
    try:
        url = f"{server}/keyed"
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # open without the key
        with pytest.raises(openai.AuthenticationError) as refused_key:
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert refused_key.value.body["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0, timeout=120)
        assert client.models.list().data[0].id == MODEL
        refused, done, errors = [], [], []

        def worker():
            try:
                client.completions.create(
                    model=MODEL, prompt="import json", max_tokens=48, extra_body={"ignore_eos": True}
                )
                done.append(1)
            except openai.RateLimitError as error:
                refused.append((error.response.headers.get("retry-after"), error.body["code"]))
            except Exception as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=worker) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not errors and refused and done
        assert all(value == ("1", "queue_full") for value in refused)
    finally:
        serve.delete("keyed")
