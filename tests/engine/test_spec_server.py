"""The server with ``--speculative-config``: the server tests that share one server run again against a
server that speculates, and its answers and metrics show the drafts."""

import json
import re

import httpx
import pytest
from api.test_server import (  # noqa: F401  (collected here again, against the fixtures below)
    test_chat_streamed_equals_whole,
    test_completions_streamed_equals_whole_with_token_prompts_and_echo,
    test_errors_are_openai_errors,
    test_fuzzed_bodies_get_4xx_openai_errors,
    test_logprobs,
    test_metrics_and_extensions,
    test_models_health_version,
    test_n_seed_and_stop,
    test_sixteen_streams_half_dropped,
)

from helpers.servers import running_server

pytestmark = pytest.mark.slow

# No turn-down: every step with a match verifies drafts (the turn-down depends on measured times).
SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
    "adaptive": False,
}
REPETITIVE = "one two three four five six seven eight. " * 6 + "one two three"


@pytest.fixture(scope="module")
def server():
    with running_server("--max-num-seqs", "16", "--speculative-config", json.dumps(SPEC)) as (url, _):
        yield url


def _metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_greedy_answers_equal_the_engine_without_speculation_and_metrics_count_drafts(server, client):  # noqa: F811
    from clex_serve import LLM, SamplingParams

    drafted_before = _metric(server, "clex_serve_spec_decode_num_draft_tokens_total")
    answer = client.completions.create(model="clex-serve-demo", prompt=REPETITIVE, max_tokens=48, temperature=0)
    [plain] = LLM(device="cpu", show_progress=False).generate(REPETITIVE, SamplingParams(temperature=0, max_tokens=48))
    assert answer.choices[0].text == plain.outputs[0].text
    drafted = _metric(server, "clex_serve_spec_decode_num_draft_tokens_total")
    accepted = _metric(server, "clex_serve_spec_decode_num_accepted_tokens_total")
    assert drafted > drafted_before and 0 < accepted <= drafted
    rate = _metric(server, "clex_serve_spec_decode_acceptance_rate")
    assert abs(rate - accepted / drafted) < 1e-6
    assert _metric(server, "clex_serve_spec_decode_mean_accepted_length") > 1
