"""Speculative decoding through LLM.generate on the reference checkpoints: greedy outputs equal the golden ones
token for token (alone, batched with requests at other scales, under preemption), drafts never cross a CLEX
scale boundary, aborts mid-verification leave the KV pool empty, the prefix cache serves no rejected token,
and the other request parameters (stop strings, max/min tokens, n, logprobs, penalties, seeds) give what
they give without speculation."""

import pytest
import torch

from clex_serve import SamplingParams
from helpers.reference import REFERENCE_MODELS, reference_cases, reference_prompt

GREEDY_TO_LIMIT = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, logprobs=2)
GREEDY_PROMPTS = (7, 35)
# Drafts wherever the last token occurred before, and no turn-down: as many verify steps (and rejections)
# as the short golden sequences allow.
EAGER_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
EAGER_SPEC = {**EAGER_SPEC, "adaptive": False}


def _assert_golden_greedy(name, prompt_len, completion):
    cases = reference_cases(name)
    assert completion.token_ids == cases[f"greedy_from_{prompt_len}"].tolist()
    expected = torch.log_softmax(cases[f"greedy_logits_from_{prompt_len}"], dim=-1)
    for position, (token, logprobs) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert abs(logprobs[token].logprob - expected[position, token].item()) < 1e-4
        top = expected[position].topk(2)
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            assert abs(logprobs[index].logprob - value) < 1e-4


class GoldenProposer:
    """Drafts the golden greedy continuation itself: every draft is accepted, so drafts run as long as the
    scale schedule lets them."""

    def __init__(self, golden: list[int]) -> None:
        self.golden = golden

    def propose(self, seq_id, token_ids, max_tokens):
        for prompt_len, continuation in self.golden:
            done = len(token_ids) - prompt_len
            if done >= 0:
                return continuation[done : done + max_tokens]
        return []

    def release(self, seq_id):
        pass


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_greedy_with_ngram_drafts_matches_golden_alone_and_batched(name, engines):
    llm = engines(name, speculative_config=EAGER_SPEC)
    for prompt_len in GREEDY_PROMPTS:
        [output] = llm.generate(reference_prompt(name, prompt_len), GREEDY_TO_LIMIT)
        _assert_golden_greedy(name, prompt_len, output.outputs[0])
    riders = [reference_prompt(name, 60), reference_prompt(name, 90), reference_prompt(name, 3)]
    prompts = [reference_prompt(name, p) for p in GREEDY_PROMPTS] + riders
    params = [GREEDY_TO_LIMIT] * 2 + [SamplingParams(temperature=0.7, seed=5, max_tokens=30, ignore_eos=True)] * 3
    for prompt_len, output in zip(GREEDY_PROMPTS, llm.generate(prompts, params)):
        _assert_golden_greedy(name, prompt_len, output.outputs[0])
    stats = llm.engine.stats()
    assert stats.spec_drafted_tokens > stats.spec_accepted_tokens > 0  # drafts were verified, and some rejected
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


@pytest.mark.parametrize("name", ["llama_logscale", "phi"])
def test_drafts_stop_at_each_scale_boundary(name, engines):
    """All-accepted drafts of 8 tokens: no verify chunk crosses a multiple of the base window (32), where the
    scale of every cached key changes; outputs stay golden, and each chunk's scale is its next token's."""
    llm = engines(name, speculative_config={**EAGER_SPEC, "num_speculative_tokens": 8}, block_size=4)
    engine = llm.engine
    cases = reference_cases(name)
    engine.drafter.proposer = GoldenProposer([(7, cases["greedy_from_7"].tolist())])
    chunks = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        chunks.extend((c.start, c.end, c.scale, len(c.draft_token_ids)) for c in plan.decodes if c.draft_token_ids)
        return plan

    engine.scheduler.schedule = recording_schedule
    try:
        [output] = llm.generate(reference_prompt(name, 7), GREEDY_TO_LIMIT)
    finally:
        del engine.scheduler.schedule
    _assert_golden_greedy(name, 7, output.outputs[0])
    base = 32
    assert chunks and max(drafts for *_, drafts in chunks) == 8
    for start, end, scale, _ in chunks:
        length_before = start + 1
        assert -(-end // base) == -(-length_before // base), (start, end)  # same base window
        assert scale == engine.scale_for_length(length_before) == engine.scale_for_length(end)
    ends = {end for _, end, _, _ in chunks}
    assert {32, 64, 96} <= ends  # drafts cut exactly at the boundaries, the rest verified after re-rotation
    stats = engine.stats()
    assert stats.spec_accepted_tokens == stats.spec_drafted_tokens


def test_preemption_with_drafts_keeps_golden_outputs(engines):
    from clex_serve.config import ModelConfig
    from clex_serve.engine.worker.kv_cache import bytes_per_block
    from helpers.reference import FIXTURES

    name = "llama"
    per_block = bytes_per_block(ModelConfig.from_file(FIXTURES / name / "config.json"), 4, torch.float32)
    llm = engines(name, block_size=4, kv_cache_memory_gib=41 * per_block / 2**30, speculative_config=EAGER_SPEC)
    engine = llm.engine
    outputs = llm.generate([reference_prompt(name, p) for p in (7, 35, 7, 35)], GREEDY_TO_LIMIT)
    assert engine.scheduler.num_preemptions > 0 and engine.stats().spec_drafted_tokens > 0
    for prompt_len, output in zip((7, 35, 7, 35), outputs):
        _assert_golden_greedy(name, prompt_len, output.outputs[0])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_aborts_during_verification_leave_the_kv_pool_empty(engines):
    llm = engines("mixtral", block_size=4, speculative_config=EAGER_SPEC)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    ids = [engine.add_request(reference_prompt("mixtral", p), params) for p in (5, 40, 70)]
    verifying = False
    for _ in range(200):  # until a step has verify chunks in flight
        plan = engine.scheduler.schedule()
        if not plan.chunks:
            continue
        verifying = any(chunk.draft_token_ids for chunk in plan.decodes)
        result = engine.worker.execute(plan)
        if verifying:
            break
        engine.scheduler.update_from_output(plan, result.sampled)
    assert verifying
    # The step's drafts hold blocks past every sequence's tokens; aborting now must give back all of them.
    for request_id in ids:
        assert engine.abort_request(request_id).outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_prefix_cache_never_serves_a_rejected_token(engines):
    """Rejected drafts are written into KV slots and taken back. With the prefix cache on, prompts that reuse
    blocks of earlier requests (whose decodes verified and rejected drafts, and whose blocks were freed and
    reused) give the outputs of an engine with neither."""
    name = "llama"
    tokens = reference_cases(name)["sequence"].tolist()
    lengths = [20, 28, 40, 60, 60, 30, 36, 9, 9]
    prompts = [{"prompt_token_ids": tokens[:n]} for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    plain = engines(name, block_size=4).generate(prompts, params)
    llm = engines(name, block_size=4, enable_prefix_caching=True, speculative_config=EAGER_SPEC)
    llm.generate(prompts[:3], params)
    rejected_before = llm.engine.stats().spec_drafted_tokens - llm.engine.stats().spec_accepted_tokens
    assert rejected_before > 0
    cached = llm.generate(prompts, params)
    assert llm.engine.block_manager.prefix_hits > 0
    for a, b in zip(plain, cached):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(next(iter(x.values())).logprob - next(iter(y.values())).logprob) < 1e-4
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def _same_outputs(a, b):
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
        assert [c.text for c in x.outputs] == [c.text for c in y.outputs]
        assert [c.finish_reason for c in x.outputs] == [c.finish_reason for c in y.outputs]
        assert [c.stop_reason for c in x.outputs] == [c.stop_reason for c in y.outputs]


@pytest.mark.parametrize("name", ["mixtral", "phi"])
def test_request_parameters_give_the_same_outputs_with_drafts(name, engines):
    """Stop strings met inside a verified run, max_tokens and min_tokens cutting drafts, n, logit bias,
    penalties (which draft nothing), and seeded sampling: each output equals the one without speculation."""
    plain = engines(name)
    spec = engines(name, speculative_config=EAGER_SPEC)
    [free] = plain.generate(reference_prompt(name, 20), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    text = free.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cases = [
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0, max_tokens=60, stop=[stop], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=13, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0, max_tokens=40, min_tokens=30, stop_token_ids=[free.outputs[0].token_ids[3]]),
        SamplingParams(temperature=0, max_tokens=40, logit_bias={7: 5.0, 11: -100.0}),
        SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=50, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=60, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.8, min_p=0.1, seed=3, max_tokens=60),
    ]
    prompts = [reference_prompt(name, 20)] * 6 + [
        reference_prompt(name, 9),
        reference_prompt(name, 30),
        reference_prompt(name, 40),
    ]
    before = spec.engine.stats().spec_accepted_tokens
    _same_outputs(plain.generate(prompts, cases), spec.generate(prompts, cases))
    assert spec.engine.stats().spec_accepted_tokens > before
    # One at a time too: a step's neighbours change neither.
    for prompt, params in zip(prompts, cases):
        _same_outputs(plain.generate(prompt, params), spec.generate(prompt, params))


def test_off_by_default(engines):
    llm = engines("llama")
    assert llm.engine.drafter is None and llm.engine.engine_config.speculative_config is None
    llm.generate(reference_prompt("llama", 7), SamplingParams(temperature=0, max_tokens=20))
    assert llm.engine.stats().spec_drafted_tokens == 0
