"""LLM.generate on the reference checkpoints: golden greedy outputs alone, in mixed batches, under
preemption and with prefix caching; prompt logprobs; seeded sampling independent of the batch."""

import pytest
import torch

from clex_serve import SamplingParams
from helpers.reference import REFERENCE_MODELS, reference_cases, reference_prompt

GREEDY_TO_LIMIT = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, logprobs=2)
GREEDY_PROMPTS = (7, 35)


def _assert_golden_greedy(name, prompt_len, completion):
    cases = reference_cases(name)
    assert completion.token_ids == cases[f"greedy_from_{prompt_len}"].tolist()
    assert completion.finish_reason == "length"
    expected = torch.log_softmax(cases[f"greedy_logits_from_{prompt_len}"], dim=-1)
    for position, (token, logprobs) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert abs(logprobs[token].logprob - expected[position, token].item()) < 1e-4
        assert logprobs[token].rank == 1
        top = expected[position].topk(2)
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            assert abs(logprobs[index].logprob - value) < 1e-4


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_greedy_alone_matches_golden(name, engines):
    llm = engines(name)
    for prompt_len in GREEDY_PROMPTS:
        [output] = llm.generate(reference_prompt(name, prompt_len), GREEDY_TO_LIMIT)
        _assert_golden_greedy(name, prompt_len, output.outputs[0])


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_greedy_in_a_mixed_batch_matches_golden(name, engines):
    """Both golden prompts plus riders of other lengths, so sequences at scales 1..4 share steps."""
    llm = engines(name)
    riders = [reference_prompt(name, 60), reference_prompt(name, 90), reference_prompt(name, 3)]
    prompts = [reference_prompt(name, p) for p in GREEDY_PROMPTS] + riders
    params = [GREEDY_TO_LIMIT] * 2 + [SamplingParams(temperature=0.7, seed=5, max_tokens=30, ignore_eos=True)] * 3
    outputs = llm.generate(prompts, params)
    for prompt_len, output in zip(GREEDY_PROMPTS, outputs):
        _assert_golden_greedy(name, prompt_len, output.outputs[0])


def test_prompt_logprobs_are_the_log_softmax_of_prefill_logits(engines):
    name = "phi"
    llm = engines(name)
    cases = reference_cases(name)
    for length in (33, 103):
        [output] = llm.generate(reference_prompt(name, length), SamplingParams(max_tokens=1, prompt_logprobs=1))
        expected = torch.log_softmax(cases[f"prefill_{length}"], dim=-1)
        tokens = output.prompt_token_ids
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == length
        for position in range(1, length):
            entry = output.prompt_logprobs[position]
            assert abs(entry[tokens[position]].logprob - expected[position - 1, tokens[position]].item()) < 1e-4
            best = int(expected[position - 1].argmax())
            assert abs(entry[best].logprob - expected[position - 1, best].item()) < 1e-4


def test_seeded_request_is_reproducible_inside_a_busy_batch(engines):
    llm = engines("mixtral")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=40, ignore_eos=True)
    [alone] = llm.generate(reference_prompt("mixtral", 20), seeded)
    noise = SamplingParams(temperature=1.2, max_tokens=60, ignore_eos=True)
    busy = llm.generate(
        [reference_prompt("mixtral", 50), reference_prompt("mixtral", 20), reference_prompt("mixtral", 9)],
        [noise, seeded, noise],
    )
    assert busy[1].outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=40, ignore_eos=True)
    assert (
        llm.generate(reference_prompt("mixtral", 20), other_seed)[0].outputs[0].token_ids != alone.outputs[0].token_ids
    )


@pytest.mark.parametrize("name", ["llama", "llama_logscale"])
def test_tiny_kv_pool_preempts_and_keeps_greedy_outputs(name, engines):
    # 40 blocks of 4 = 160 slots: one sequence at the 128-token limit fits, four cannot run together.
    from clex_serve.config import ModelConfig
    from clex_serve.engine.worker.kv_cache import bytes_per_block
    from helpers.reference import FIXTURES

    per_block = bytes_per_block(ModelConfig.from_file(FIXTURES / name / "config.json"), 4, torch.float32)
    # The budget covers the pool's padding block too.
    llm = engines(name, block_size=4, kv_cache_memory_gib=41 * per_block / 2**30)
    engine = llm.engine
    assert engine.block_manager.num_blocks == 40
    prompts = [reference_prompt(name, p) for p in (7, 35, 7, 35)]
    outputs = llm.generate(prompts, GREEDY_TO_LIMIT)
    assert engine.scheduler.num_preemptions > 0
    for prompt_len, output in zip((7, 35, 7, 35), outputs):
        _assert_golden_greedy(name, prompt_len, output.outputs[0])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_aborted_and_finished_requests_free_every_block(engines):
    llm = engines("llama", block_size=4)
    engine = llm.engine
    ids = [
        engine.add_request(reference_prompt("llama", p), SamplingParams(max_tokens=50, ignore_eos=True))
        for p in (5, 40, 70)
    ]
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    aborted = engine.abort_request(ids[1])
    assert aborted.outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("name", ["llama", "llama_logscale", "mixtral"])
def test_prefix_caching_gives_identical_outputs(name, engines):
    tokens = reference_cases(name)["sequence"].tolist()
    # Shared prefixes at t = 1 (20, 28), t = 2 (40, 60, 60) and prompts straddling a boundary (30 -> 36).
    lengths = [20, 28, 40, 60, 60, 30, 36]
    prompts = [{"prompt_token_ids": tokens[:n]} for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    plain = engines(name, block_size=4).generate(prompts, params)
    cached_llm = engines(name, block_size=4, enable_prefix_caching=True)
    cached_llm.generate(prompts[:3], params)  # warm the prefix cache
    hits_before = cached_llm.engine.block_manager.prefix_hits
    cached = cached_llm.generate(prompts, params)
    assert cached_llm.engine.block_manager.prefix_hits > hits_before
    for a, b in zip(plain, cached):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(next(iter(x.values())).logprob - next(iter(y.values())).logprob) < 1e-4


def test_stop_strings_never_reach_streamed_or_final_text(engines):
    llm = engines("llama")
    engine = llm.engine
    prompt = {"prompt": "def generate(prompt"}
    [free] = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    text = free.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop in text
    request_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    streamed = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == request_id
            streamed.append(output.outputs[0].text)
    final = streamed[-1]
    assert final == text[: text.index(stop)]
    assert all(stop not in piece for piece in streamed)
    assert all(later.startswith(earlier) for earlier, later in zip(streamed, streamed[1:]))
    assert output.outputs[0].finish_reason == "stop" and output.outputs[0].stop_reason == stop


def test_n_samples_differ_and_eos_ends_a_sample(engines):
    llm = engines("mixtral")
    [output] = llm.generate(
        reference_prompt("mixtral", 10), SamplingParams(n=3, temperature=1.5, seed=7, max_tokens=20)
    )
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) == 3
    for completion in output.outputs:
        eos = 2 in completion.token_ids
        assert completion.finish_reason == ("stop" if eos else "length")
        assert not eos or completion.token_ids[-1] == 2


def test_too_long_prompt_is_refused_before_any_work(engines):
    llm = engines("phi")
    with pytest.raises(ValueError, match="reads at most 128"):
        llm.generate({"prompt_token_ids": [5] * 128})
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("name", ["llama_logscale", "phi"])
def test_chunked_prompts_equal_one_pass(name, engines):
    """With 16 batched tokens per step, prompts run in chunks at the full prompt's scale: golden greedy
    outputs, and prompt logprobs equal to the one-pass prefill logits."""
    llm = engines(name, max_num_batched_tokens=16, block_size=4)
    outputs = llm.generate([reference_prompt(name, p) for p in GREEDY_PROMPTS], GREEDY_TO_LIMIT)
    for prompt_len, output in zip(GREEDY_PROMPTS, outputs):
        _assert_golden_greedy(name, prompt_len, output.outputs[0])
    [output] = llm.generate(reference_prompt(name, 65), SamplingParams(max_tokens=1, prompt_logprobs=0))
    expected = torch.log_softmax(reference_cases(name)["prefill_65"], dim=-1)
    assert len(output.prompt_logprobs) == 65
    for position in range(1, 65):
        token = output.prompt_token_ids[position]
        assert abs(output.prompt_logprobs[position][token].logprob - expected[position - 1, token].item()) < 1e-4


def test_copy_on_write_blocks_are_reserved_when_planned(engines, monkeypatch):
    """Prefix caching on a pool cut so that at one step two sequences sharing eight prompt blocks cross from
    scale 2 to 3 together (each must copy the shared blocks before re-rotating) while a third needs a new
    block: the first sequence's copies are taken as its chunk is planned, the third is preempted instead
    of the step running out of blocks, and every output is the golden greedy one."""
    from clex_serve.config import ModelConfig
    from clex_serve.engine.worker.kv_cache import bytes_per_block
    from helpers.reference import FIXTURES

    name = "llama"
    per_block = bytes_per_block(ModelConfig.from_file(FIXTURES / name / "config.json"), 4, torch.float32)
    # 43 usable blocks: 10 are free when the shared sequences reach 65 tokens (the padding block on top).
    llm = engines(name, block_size=4, kv_cache_memory_gib=44 * per_block / 2**30, enable_prefix_caching=True)
    engine = llm.engine
    assert engine.block_manager.num_blocks == 43
    copies = []
    original_copy = engine.worker.runner.copy_blocks
    monkeypatch.setattr(engine.worker.runner, "copy_blocks", lambda pairs: (copies.extend(pairs), original_copy(pairs)))
    preemptions = engine.scheduler.num_preemptions

    engine.add_request(reference_prompt(name, 35), GREEDY_TO_LIMIT, "first")
    finished = {output.request_id: output for output in engine.step() if output.finished}
    engine.add_request(reference_prompt(name, 35), GREEDY_TO_LIMIT, "shares-the-prefix")
    engine.add_request(reference_prompt(name, 7), GREEDY_TO_LIMIT, "needs-a-block")
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        finished.update({output.request_id: output for output in engine.step() if output.finished})
    assert engine.block_manager.prefix_hits >= 32
    assert len(copies) >= 8 and engine.scheduler.num_preemptions > preemptions
    _assert_golden_greedy(name, 35, finished["first"].outputs[0])
    _assert_golden_greedy(name, 35, finished["shares-the-prefix"].outputs[0])
    _assert_golden_greedy(name, 7, finished["needs-a-block"].outputs[0])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
