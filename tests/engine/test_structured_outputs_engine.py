"""Structured outputs in the engine (offline API, the embedded CLEX model): outputs match their constraint at
every CLEX scale and across a scale change, with prefix caching, under preemption, with penalties; rows
without a constraint are untouched by their neighbours' masks; a constraint that does not compile is a
ValueError before anything runs; compiled grammars are cached."""

import json

import jsonschema
import pytest
import torch

from clex_serve import LLM, SamplingParams, StructuredOutputsParams
from clex_serve.engine.structured.compiler import GrammarError
from helpers.json_schemas import SCHEMAS

BASE_WINDOW = 128  # the embedded model's training length: its CLEX scale grows past it


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", show_progress=False, enable_prefix_caching=True)


def json_params(name: str, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=200, structured_outputs=StructuredOutputsParams(json=SCHEMAS[name]), **extra)


def long_prompt(llm: LLM, num_tokens: int) -> list[int]:
    text = "def add(a, b):\n    return a + b\n\n" * 200
    return llm.get_tokenizer().encode(text)[:num_tokens]


def assert_valid(output, name: str) -> None:
    for completion in output.outputs:
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), SCHEMAS[name])


@pytest.mark.parametrize("prompt_len", [20, BASE_WINDOW - 10, 3 * BASE_WINDOW, 9 * BASE_WINDOW])
def test_outputs_match_at_every_clex_scale_and_across_a_scale_change(llm, prompt_len):
    engine = llm.engine
    prompt = long_prompt(llm, prompt_len)
    start_scale = engine.scale_for_length(prompt_len)
    [output] = llm.generate([{"prompt_token_ids": prompt}], json_params("many_required", temperature=0.7, seed=1, n=2))
    assert_valid(output, "many_required")
    end = prompt_len + max(len(c.token_ids) for c in output.outputs)
    if prompt_len == BASE_WINDOW - 10:  # this output runs past the base window: its scale changed
        assert engine.scale_for_length(end) > start_scale == 1


def test_a_batch_mixes_constrained_and_free_rows_without_leaking_masks(llm):
    free = SamplingParams(max_tokens=24, temperature=0)
    prompts = ["import os\n", "def f(x):\n", "class A:\n"]
    alone = [out.outputs[0].token_ids for out in llm.generate(prompts, free)]
    mixed = llm.generate(
        prompts + ["USER: a person ASSISTANT:", "USER: colors ASSISTANT:"],
        [free] * 3 + [json_params("person", temperature=0), json_params("enum_color", temperature=0.8, seed=2)],
    )
    assert [out.outputs[0].token_ids for out in mixed[:3]] == alone
    assert_valid(mixed[3], "person")
    assert_valid(mixed[4], "enum_color")


def test_a_cached_prefix_gives_the_same_constrained_output(llm):
    engine = llm.engine
    # Inside one scale (4 to 5 base windows) until the output ends: a cache re-rotated for a new scale no longer
    # serves the old one.
    prompt = {"prompt_token_ids": long_prompt(llm, 4 * BASE_WINDOW + 20)}
    params = json_params("refs", temperature=0)
    first = llm.generate([prompt], params)[0].outputs[0]
    hits = engine.stats().prefix_cache_hit_tokens
    second = llm.generate([prompt], params)[0].outputs[0]
    assert engine.stats().prefix_cache_hit_tokens > hits
    assert second.token_ids == first.token_ids
    jsonschema.validate(json.loads(second.text), SCHEMAS["refs"])


def test_preempted_constrained_sequences_resume_where_their_grammar_was():
    from clex_serve.assets import DEFAULT_MODEL_PATH
    from clex_serve.config import ModelConfig
    from clex_serve.engine.worker.kv_cache import bytes_per_block

    per_block = bytes_per_block(ModelConfig.from_file(DEFAULT_MODEL_PATH / "config.json"), 16, torch.float32)
    small = LLM(
        dtype="float32", device="cpu", show_progress=False, block_size=16, kv_cache_memory_gib=140 * per_block / 2**30
    )
    names = ["array_of_objects", "many_required", "nested_address", "refs"] * 3
    prompts = [{"prompt_token_ids": long_prompt(small, 400 + 7 * i)} for i in range(len(names))]
    outputs = small.generate(prompts, [json_params(name, temperature=0.8, seed=i) for i, name in enumerate(names)])
    assert small.engine.scheduler.num_preemptions > 0
    for name, output in zip(names, outputs):
        assert_valid(output, name)
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def test_penalties_bias_and_min_tokens_do_not_break_the_grammar(llm):
    params = json_params(
        "array_min_items",
        temperature=0.9,
        seed=3,
        repetition_penalty=1.3,
        frequency_penalty=1.0,
        logit_bias={2: 50.0},  # pushes EOS, which the grammar allows only at the end
        min_tokens=150,  # more than the schema's outputs take: the grammar ends them
    )
    [output] = llm.generate(["USER: ids ASSISTANT:"], params)
    assert_valid(output, "array_min_items")


def test_a_constraint_that_does_not_compile_is_refused_before_it_runs(llm):
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "nonsense"}))
    with pytest.raises(GrammarError, match="nonsense"):
        llm.generate(["hello", "world"], [SamplingParams(), bad])
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])


def test_a_compiled_grammar_is_reused(llm):
    compiler = llm.engine.grammars
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"unique_to_this_test": {"type": "integer"}}})
    cache = compiler._xgrammar_compiler()
    before = cache.get_cache_size_bytes()
    compiler.compile(spec)
    after_first = cache.get_cache_size_bytes()
    compiler.compile(StructuredOutputsParams(json=json.loads(spec.json)))  # the same schema, sent again
    assert after_first > before and cache.get_cache_size_bytes() == after_first
