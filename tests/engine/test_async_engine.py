"""The asyncio engine under the conditions a server meets: slow and vanishing consumers, aborts, shutdown,
bad requests beside good ones, a step in progress, and failing steps. Every scenario runs under a timeout,
and waits on events rather than on time, so none depends on the machine's speed."""

import asyncio
import threading

import pytest

from clex_serve import LLM, SamplingParams
from clex_serve.engine import async_engine as async_module
from clex_serve.engine.async_engine import AsyncLLMEngine
from clex_serve.engine.errors import EngineDeadError, EngineShutdownError
from clex_serve.sampling_params import RequestOutputKind
from helpers.models import model_with_tokenizer
from helpers.reference import reference_cases

NAME = "llama"
GREEDY = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
DELTA = RequestOutputKind.DELTA


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(
        str(model_with_tokenizer(NAME, tmp_path_factory.mktemp("model"))),
        dtype="float32",
        device="cpu",
        show_progress=False,
        block_size=4,
    )


@pytest.fixture
def engine(llm):
    async_engine = AsyncLLMEngine(llm.engine, idle_wait=0.05)
    yield async_engine
    async_engine.shutdown()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def prompt(length):
    return {"prompt_token_ids": reference_cases(NAME)["sequence"][:length].tolist()}


def golden(length):
    return reference_cases(NAME)[f"greedy_from_{length}"].tolist()


def run(coroutine, timeout=120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=timeout))


async def collect(engine, request, params, request_id=None):
    outputs = []
    async for output in engine.generate(request, params, request_id):
        outputs.append(output)
    return outputs


def test_streams_deltas_and_a_vanishing_consumer_aborts(engine, llm):
    async def scenario():
        outputs = await collect(
            engine, prompt(7), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, output_kind=DELTA)
        )
        stream = engine.generate(prompt(35), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()  # a client going away aborts its request
        return outputs

    outputs = run(scenario())
    assert [t for output in outputs for t in output.outputs[0].token_ids] == golden(7)
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"


def test_abort_gives_the_waiting_consumer_a_final_abort_output(engine):
    async def scenario():
        stream = engine.generate(
            prompt(7), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), request_id="to-abort"
        )
        first = await stream.__anext__()
        engine.abort("to-abort")
        rest = [output async for output in stream]
        return first, rest

    first, rest = run(scenario())
    assert not first.finished and rest[-1].finished
    assert rest[-1].outputs[0].finish_reason == "abort"
    assert len(rest[-1].outputs[0].token_ids) < len(golden(7))


def test_shutdown_ends_pending_generators(llm):
    engine = AsyncLLMEngine(llm.engine, idle_wait=0.05)

    async def scenario():
        stream = engine.generate(prompt(7), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineShutdownError):
            async for _ in stream:
                pass
        with pytest.raises(EngineShutdownError):
            await engine.generate(prompt(7), GREEDY).__anext__()

    run(scenario())
    assert not llm.engine.has_unfinished_requests()


def test_bad_stop_id_is_refused_at_submission_while_another_request_finishes(engine, llm):
    vocab = llm.engine.model_config.vocab_size

    async def scenario():
        good = asyncio.create_task(collect(engine, prompt(35), GREEDY))
        with pytest.raises(ValueError, match=rf"stop_token_ids: {vocab + 5} is not in the vocabulary"):
            await engine.generate(prompt(7), SamplingParams(stop_token_ids=[vocab + 5])).__anext__()
        return await good

    outputs = run(scenario())
    assert outputs[-1].outputs[0].token_ids == golden(35)


def test_requests_are_answered_while_a_step_is_in_progress(engine, llm, monkeypatch):
    """The engine thread is held inside a prefill step (it waits on an event): meanwhile the event loop
    keeps running, a bad request is refused, a good one is accepted and an abort goes through. Released,
    every request completes."""
    runner = llm.engine.worker.runner
    original = runner.execute
    entered, release = threading.Event(), threading.Event()

    def held_execute(steps):
        if any(len(step.token_ids) > 1 for step in steps) and not release.is_set():
            entered.set()
            release.wait(timeout=60)
        return original(steps)

    monkeypatch.setattr(runner, "execute", held_execute)

    async def scenario():
        long_one = asyncio.create_task(collect(engine, prompt(35), GREEDY))
        await asyncio.to_thread(entered.wait, 60)
        ticks = 0
        for _ in range(5):  # the loop is free: it runs other coroutines while the step is held
            await asyncio.sleep(0.001)
            ticks += 1
        with pytest.raises(ValueError, match="prompt token id"):
            await engine.generate({"prompt_token_ids": [1, 10**6]}, GREEDY).__anext__()
        second = asyncio.create_task(collect(engine, prompt(7), GREEDY))
        aborted = engine.generate(prompt(7), GREEDY, request_id="abort-me")
        aborted_first = asyncio.create_task(aborted.__anext__())
        await asyncio.sleep(0)
        engine.abort("abort-me")
        assert not release.is_set() and ticks == 5  # all of the above happened inside the held step
        release.set()
        first_of_aborted = await aborted_first
        return await long_one, await second, first_of_aborted

    long_one, second, aborted = run(scenario())
    assert long_one[-1].outputs[0].token_ids == golden(35)
    assert second[-1].outputs[0].token_ids == golden(7)
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"


def test_a_consumer_that_reads_nothing_holds_one_pending_output(engine, llm, monkeypatch):
    """300 decode steps while the consumer reads nothing: its stream never holds more than one output, and
    the next read returns everything it missed, merged."""
    streams = []
    original_stream = async_module.RequestStream

    class RecordedStream(original_stream):
        def __init__(self, *args):
            super().__init__(*args)
            streams.append(self)

    monkeypatch.setattr(async_module, "RequestStream", RecordedStream)
    pending_seen = []
    original_step = llm.engine.step

    def step():
        outputs = original_step()
        pending_seen.extend(stream.num_pending for stream in streams)
        return outputs

    monkeypatch.setattr(llm.engine, "step", step)

    async def scenario():
        stream = engine.generate(
            prompt(7), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, output_kind=DELTA, logprobs=1)
        )
        first = await stream.__anext__()
        while not streams[0].closed:  # read nothing until the engine has finished the request
            await asyncio.sleep(0.01)
        rest = [output async for output in stream]
        return first, rest

    first, rest = run(scenario())
    assert len(pending_seen) >= 100 and max(pending_seen) <= 1
    assert len(rest) == 1 and rest[0].finished
    tokens = first.outputs[0].token_ids + rest[0].outputs[0].token_ids
    assert tokens == golden(7)
    assert len(first.outputs[0].logprobs) + len(rest[0].outputs[0].logprobs) == len(tokens)
    text = llm.get_tokenizer().decode(tokens)
    assert first.outputs[0].text + rest[0].outputs[0].text == text


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(engine, llm, monkeypatch):
    runner = llm.engine.worker.runner
    original = runner.execute
    failures = {"left": 1}

    def failing_execute(steps):
        if failures["left"] and any(len(step.token_ids) == 20 for step in steps):
            failures["left"] -= 1
            raise IndexError("a bug in one request's step")
        return original(steps)

    monkeypatch.setattr(runner, "execute", failing_execute)

    async def scenario():
        with pytest.raises(RuntimeError, match="generation failed: a bug"):
            await collect(engine, prompt(20), GREEDY)
        return await collect(engine, prompt(7), GREEDY)

    outputs = run(scenario())
    assert outputs[-1].outputs[0].token_ids == golden(7)
    assert not engine.dead


def test_a_cuda_error_marks_the_engine_dead(llm, monkeypatch):
    engine = AsyncLLMEngine(llm.engine, idle_wait=0.05)
    runner = llm.engine.worker.runner

    def broken_execute(steps):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(runner, "execute", broken_execute)

    async def scenario():
        with pytest.raises(EngineDeadError):
            await collect(engine, prompt(7), GREEDY)
        await asyncio.to_thread(engine._thread.join, 30)
        assert engine.dead and not engine.running
        with pytest.raises(EngineDeadError):
            await engine.generate(prompt(7), GREEDY).__anext__()

    try:
        run(scenario())
    finally:
        engine.shutdown()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
