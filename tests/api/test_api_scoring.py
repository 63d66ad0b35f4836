"""Scoring prompts through ``/v1/completions`` as lm-evaluation-harness does (``echo`` with ``logprobs``): a
small multiple-choice set scored by a real server gives the engine's own prompt logprobs, and picks the
same answers."""

import httpx
import pytest

from clex_serve import LLM, SamplingParams

MODEL = "clex-serve-demo"
QUESTIONS = [
    ("def add(a, b):\n    return", [" a + b", " a - b", " None"]),
    ("import json\n\ndata = json.", ["loads(text)", "dumps(data)", "banana"]),
    ("USER: What does json.dumps do? ASSISTANT:", [" Return a string.", " It is a fish.", " 42"]),
]


@pytest.fixture(scope="module")
def engine_llm():
    return LLM(dtype="float32", device="cpu", show_progress=False)


def tokenize(server: str, text: str, special: bool) -> list[int]:
    return httpx.post(f"{server}/tokenize", json={"prompt": text, "add_special_tokens": special}, timeout=10).json()[
        "tokens"
    ]


def engine_scores(llm: LLM, token_ids: list[int]) -> list[float | None]:
    [output] = llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))
    return [None if entry is None else entry[token].logprob for token, entry in zip(token_ids, output.prompt_logprobs)]


def test_multiple_choice_scores_match_the_engine(server, client, engine_llm):
    for context, choices in QUESTIONS:
        context_ids = tokenize(server, context, special=True)
        served, own = [], []
        for choice in choices:
            ids = context_ids + tokenize(server, choice, special=False)
            # lm-evaluation-harness's request: one generated token, which it drops ([ctxlen:-1]).
            harness = (
                client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
                .choices[0]
                .logprobs
            )
            assert len(harness.token_logprobs) == len(ids) + 1 and harness.token_logprobs[0] is None
            scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1).choices[0]
            assert scored.finish_reason == "length" and len(scored.logprobs.token_logprobs) == len(ids)
            assert scored.logprobs.token_logprobs == harness.token_logprobs[:-1]
            expected = engine_scores(engine_llm, ids)
            assert expected[0] is None
            assert scored.logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
            continuation = slice(len(context_ids), len(ids))
            served.append(sum(scored.logprobs.token_logprobs[continuation]))
            own.append(sum(expected[continuation]))
            # Every listed alternative includes the prompt's own token, and the top one is the greedy choice.
            for token, top in zip(scored.logprobs.tokens[1:], scored.logprobs.top_logprobs[1:]):
                assert token in top
        assert max(range(len(choices)), key=served.__getitem__) == max(range(len(choices)), key=own.__getitem__)


def test_echo_with_logprobs_streamed_equals_whole(client):
    whole = client.completions.create(
        model=MODEL, prompt="import json", max_tokens=4, echo=True, logprobs=2, temperature=0
    ).choices[0]
    assert whole.logprobs.token_logprobs[0] is None
    prompt_len = len(whole.logprobs.tokens) - 4
    assert all(value is not None for value in whole.logprobs.token_logprobs[1:])
    assert whole.text.startswith("import json")
    offsets = whole.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[prompt_len] == offsets[prompt_len - 1] + len(
        whole.logprobs.tokens[prompt_len - 1]
    )
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="import json", max_tokens=4, echo=True, logprobs=2, temperature=0, stream=True
        )
    )
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == whole.text
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.tokens]
    values = [v for c in streamed if c.logprobs for v in c.logprobs.token_logprobs]
    assert tokens == whole.logprobs.tokens and values == whole.logprobs.token_logprobs

    scored = list(
        client.completions.create(model=MODEL, prompt="import json", max_tokens=0, echo=True, logprobs=1, stream=True)
    )
    texts = [c.choices[0].text for c in scored if c.choices]
    assert "".join(texts) == "import json" and scored[-1].choices[0].finish_reason == "length"
