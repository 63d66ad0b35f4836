"""Decode runs (``engine/core/decode_runs.py``): a step of nothing but decodes that sample alone runs several
steps in one call. Greedy outputs equal the golden ones, and every output (greedy, seeded sampling, stops
inside a run) equals that of every step alone, across CLEX scale boundaries, batched, through the fused CPU
call and through the step-by-step fallback; the plan stops at scale boundaries, max_tokens and the token
bound, and a step with a sequence that truncates, penalises or reports logprobs runs alone."""

import pytest

from clex_serve import SamplingParams
from clex_serve.engine.core.block_manager import BlockManager
from clex_serve.engine.core.decode_runs import MAX_RUN_TOKENS, plan_decode_run
from clex_serve.engine.core.scheduler import Scheduler, SchedulerConfig
from clex_serve.engine.core.step_plan import ScheduledChunk
from helpers.reference import REFERENCE_MODELS, reference_cases, reference_prompt
from helpers.sequences import clex_scale, make_sequence

GREEDY_TO_LIMIT = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)


class RunRecorder:
    """The run length of every step the engine's scheduler plans, while in a ``with`` block."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.steps: list[int] = []

    def __enter__(self):
        schedule = self.engine.scheduler.schedule

        def recording():
            plan = schedule()
            self.steps.append(plan.run_steps)
            return plan

        self.engine.scheduler.schedule = recording
        return self

    def __exit__(self, *exc):
        del self.engine.scheduler.schedule


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_greedy_runs_give_the_golden_outputs_alone_and_batched(name, engines):
    """Alone to the model's limit (128 tokens, four scales of a base window of 32), then batched with riders
    at other lengths: token for token the official implementation's greedy continuations."""
    llm = engines(name, block_size=4, decode_run_steps=8)
    cases = reference_cases(name)
    with RunRecorder(llm.engine) as runs:
        for prompt_len in (7, 35):
            [output] = llm.generate(reference_prompt(name, prompt_len), GREEDY_TO_LIMIT)
            assert output.outputs[0].token_ids == cases[f"greedy_from_{prompt_len}"].tolist()
    assert max(runs.steps) == 8
    riders = [reference_prompt(name, n) for n in (60, 90, 3)]
    short = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = llm.generate(
        [reference_prompt(name, 7), reference_prompt(name, 35), *riders], [GREEDY_TO_LIMIT] * 2 + [short] * 3
    )
    for prompt_len, output in zip((7, 35), outputs):
        assert output.outputs[0].token_ids == cases[f"greedy_from_{prompt_len}"].tolist()
    alone = engines(name, block_size=4, decode_run_steps=1).generate(riders, short)
    assert [o.outputs[0].token_ids for o in outputs[2:]] == [o.outputs[0].token_ids for o in alone]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_the_fused_call_and_the_step_by_step_fallback_agree(engines, monkeypatch):
    """The Llama checkpoint with log_scale runs its runs in the fused CPU call; without it (as on CUDA, or a
    model the fused step does not take) the runner loops over single steps. Both give the golden tokens."""
    name = "llama_logscale"
    fused = engines(name, block_size=4, decode_run_steps=8)
    runner = fused.engine.worker.runner
    assert runner.cpu_decode is not None
    calls = []
    run = runner.cpu_decode.run
    monkeypatch.setattr(runner.cpu_decode, "run", lambda *a: calls.append(a[3]) or run(*a))
    [output] = fused.generate(reference_prompt(name, 7), GREEDY_TO_LIMIT)
    assert calls and max(calls) == 8
    golden = reference_cases(name)["greedy_from_7"].tolist()
    assert output.outputs[0].token_ids == golden
    monkeypatch.setattr(runner, "cpu_decode", None)
    with RunRecorder(fused.engine) as runs:
        [output] = fused.generate(reference_prompt(name, 7), GREEDY_TO_LIMIT)
    assert max(runs.steps) == 8 and output.outputs[0].token_ids == golden


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_stops_inside_a_run_give_what_single_steps_give(name, engines):
    """A stop token, a stop string, EOS and max_tokens met part-way through a run: the tokens after them are
    dropped, and outputs, texts and finish reasons equal those of every step alone; no block is kept."""
    golden = reference_cases(name)["greedy_from_7"].tolist()
    llm = engines(name, block_size=4, decode_run_steps=8)
    plain = engines(name, block_size=4, decode_run_steps=1)
    text = llm.engine.tokenizer.decode(golden[:12])
    first_new = next(i for i in range(3, len(golden)) if golden[i] not in golden[:i])  # stops there, not before
    params = [
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[golden[first_new]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop=[text[-3:]] if text.strip() else None),
        SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40),
    ]
    prompts = [reference_prompt(name, 7)] * len(params)
    with RunRecorder(llm.engine) as runs:
        ran = [llm.generate(prompt, p)[0] for prompt, p in zip(prompts, params)]
    assert max(runs.steps) > 1
    alone = [plain.generate(prompt, p)[0] for prompt, p in zip(prompts, params)]

    def fields(output):
        return (
            output.outputs[0].token_ids,
            output.outputs[0].text,
            output.outputs[0].finish_reason,
            output.outputs[0].stop_reason,
        )

    for a, b in zip(ran, alone):
        assert fields(a) == fields(b)
    assert ran[0].outputs[0].token_ids == golden[: first_new + 1]  # the stop token ends it, and is part of it
    assert len(ran[2].outputs[0].token_ids) == 13
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_only_steps_of_decodes_that_sample_alone_run_ahead(engines):
    """A sequence that truncates, penalises or reports logprobs in the batch: every step alone."""
    llm = engines("llama", block_size=4, decode_run_steps=8)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for other in (
        SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3),
    ):
        with RunRecorder(llm.engine) as runs:
            llm.generate([reference_prompt("llama", 7), reference_prompt("llama", 9)], [greedy, other])
        assert set(runs.steps) == {1}
    with RunRecorder(llm.engine) as runs:
        llm.generate([reference_prompt("llama", 7), reference_prompt("llama", 9)], greedy)
    assert max(runs.steps) == 8


@pytest.mark.parametrize("fused", [True, False])
def test_seeded_sampling_in_runs_samples_what_single_steps_sample(fused, engines, monkeypatch):
    """Seeded rows at a temperature, beside a greedy row and an unseeded one, over scale boundaries: the
    seeded and greedy outputs equal those of every step alone, through the fused call (uniforms drawn ahead)
    and through the sampler step by step."""
    name = "llama_logscale"
    llm = engines(name, block_size=4, decode_run_steps=8)
    plain = engines(name, block_size=4, decode_run_steps=1)
    if not fused:
        monkeypatch.setattr(llm.engine.worker.runner, "cpu_decode", None)
    params = [
        SamplingParams(temperature=0.9, seed=11, max_tokens=90, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=90, ignore_eos=True),
        SamplingParams(temperature=1.3, seed=12, max_tokens=70, ignore_eos=True),
        SamplingParams(temperature=0.7, max_tokens=50, ignore_eos=True),
    ]
    prompts = [reference_prompt(name, n) for n in (7, 20, 35, 3)]
    with RunRecorder(llm.engine) as runs:
        ran = llm.generate(prompts, params)
    assert max(runs.steps) == 8
    alone = plain.generate(prompts, params)
    for row in (0, 1, 2):
        assert ran[row].outputs[0].token_ids == alone[row].outputs[0].token_ids
    assert len(ran[3].outputs[0].token_ids) == 50
    assert len(set(ran[0].outputs[0].token_ids)) > 5  # it sampled, not a repeated token


def _decoding(seq_id, length, params=None):
    seq = make_sequence(seq_id, length, params or SamplingParams(temperature=0))
    seq.num_cached_tokens = length - 1
    return seq


def _plan(seqs, max_steps, manager, max_model_len=None):
    for seq in seqs:
        manager.allocate(seq)
    chunks = [ScheduledChunk(seq, len(seq) - 1, len(seq), None, False, False) for seq in seqs]
    return plan_decode_run(chunks, manager, clex_scale, max_steps, max_model_len), chunks


def test_a_run_stops_at_the_scale_boundary_max_tokens_and_the_token_bound():
    # clex_scale: a base window of 8. A sequence of 9 tokens decodes at scale 2 up to length 16.
    manager = BlockManager(num_blocks=64, block_size=4)
    steps, [chunk] = _plan([_decoding(0, 9)], 16, manager)
    assert steps == 8 and chunk.end == 9 - 1 + 8  # positions 8..15: lengths 9..16, all scale 2
    assert len(chunk.seq.block_table) == manager.blocks_for(16)
    steps, _ = _plan([_decoding(1, 14)], 16, manager)
    assert steps == 3  # lengths 14, 15, 16; 17 is scale 3
    steps, _ = _plan([_decoding(2, 9, SamplingParams(temperature=0, max_tokens=3))], 16, manager)
    assert steps == 3
    steps, _ = _plan([_decoding(3, 9)], 16, manager, max_model_len=12)
    assert steps == 4  # positions up to 11
    steps, _ = _plan([_decoding(4, 16)], 16, manager)
    assert steps == 1  # its next token already changes the scale: nothing to run ahead
    many = [_decoding(10 + i, 9) for i in range(MAX_RUN_TOKENS // 4)]
    steps, _ = _plan(many, 16, BlockManager(num_blocks=4096, block_size=4))
    assert steps == 4  # rows times steps within MAX_RUN_TOKENS


def test_a_run_takes_only_free_blocks_and_sequences_that_sample_alone():
    manager = BlockManager(num_blocks=3, block_size=4)
    steps, [chunk] = _plan([_decoding(0, 9)], 8, manager)  # 9 + 7 positions need a fourth block
    assert steps == 1 and chunk.end == 9 and len(chunk.seq.block_table) == 3
    manager = BlockManager(num_blocks=64, block_size=4)
    truncated = _decoding(1, 9, SamplingParams(temperature=0.5, top_k=40))
    assert _plan([_decoding(2, 9), truncated], 8, manager)[0] == 1
    assert _plan([_decoding(4, 9), _decoding(5, 9, SamplingParams(temperature=0.5))], 8, manager)[0] == 8
    waiting = SamplingParams(temperature=0, min_tokens=5)
    assert _plan([_decoding(3, 9, waiting)], 8, manager)[0] == 1  # min_tokens holds back EOS: the sampler's


def test_the_scheduler_runs_ahead_only_when_the_step_has_nothing_but_decodes():
    manager = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64), manager, clex_scale, max_run_steps=4)
    a = make_sequence(0, 3, SamplingParams(temperature=0))
    scheduler.add(a)
    assert scheduler.schedule().run_steps == 1  # the prompt
    a.num_cached_tokens = 3
    a.token_ids.append(7)
    b = make_sequence(1, 2, SamplingParams(temperature=0))
    scheduler.add(b)
    out = scheduler.schedule()
    assert out.run_steps == 1 and [c.seq for c in out.prefills] == [b]  # a prompt beside the decode
    a.num_cached_tokens, b.num_cached_tokens = 4, 2
    a.token_ids.append(7)
    b.token_ids.append(7)
    out = scheduler.schedule()
    assert out.run_steps == 4 and not out.prefills
    assert [(c.start, c.end) for c in out.decodes] == [(4, 8), (2, 6)]


def test_decode_run_steps_is_validated():
    from clex_serve.engine.engine_config import EngineConfig

    with pytest.raises(ValueError, match="decode_run_steps must be at least 1"):
        EngineConfig(decode_run_steps=0)
