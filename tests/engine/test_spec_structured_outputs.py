"""Speculative decoding with structured outputs: drafts are cut where the grammar rejects them and every
verified row is masked by the grammar after the drafts before it, so constrained outputs are the same with
speculation as without (greedy and seeded sampling), and drafts are made and kept."""

import json

import jsonschema
import pytest

from clex_serve import LLM, SamplingParams, StructuredOutputsParams
from helpers.json_schemas import SCHEMAS

NAMES = ["person", "many_required", "refs", "array_of_objects", "nested_address"]
SPECULATION = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
    "adaptive": False,  # draft every step: the test is about exactness, not speed
}


@pytest.fixture(scope="module")
def engines():
    plain = LLM(dtype="float32", device="cpu", show_progress=False)
    speculating = LLM(dtype="float32", device="cpu", show_progress=False, speculative_config=SPECULATION)
    return plain, speculating


def params(name: str, temperature: float) -> SamplingParams:
    return SamplingParams(
        temperature=temperature,
        seed=4,
        max_tokens=100,
        structured_outputs=StructuredOutputsParams(json=SCHEMAS[name]),
    )


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_constrained_outputs_equal_with_and_without_speculation(engines, temperature):
    plain, speculating = engines
    # Prompts that quote an answer of the schema, so that prompt lookup finds drafts inside the structure.
    examples = [plain.generate([f"USER: {name} ASSISTANT:"], params(name, 0.0))[0].outputs[0].text for name in NAMES]
    prompts = [f"Examples: {ex}\n{ex}\nUSER: {name} ASSISTANT:" for name, ex in zip(NAMES, examples)]
    batch = [params(name, temperature) for name in NAMES]
    drafted = speculating.engine.stats().spec_drafted_tokens
    expected = plain.generate(prompts, batch)
    got = speculating.generate(prompts, batch)
    for name, want, have in zip(NAMES, expected, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids, name
        jsonschema.validate(json.loads(have.outputs[0].text), SCHEMAS[name])
    stats = speculating.engine.stats()
    assert stats.spec_drafted_tokens > drafted and stats.spec_accepted_tokens > 0
