"""The chat sources the terminal chat and the web demo share: the sync adapter stops the async stream when
its iterator is closed or Ctrl-C interrupts it (the request's work is freed: the engine is idle again), errors
reach the reader as the one line the user reads, and a server's refusals say what the server said."""

import asyncio
import os
import signal
import threading
import time

import pytest

from clex_serve import LLM
from clex_serve.chat import ChatSource, ChatSourceError, EngineSource, OpenAISource, SyncChatSource
from clex_serve.engine.async_engine import AsyncLLMEngine
from clex_serve.sampling_params import SamplingParams
from clex_serve.text.chat_template import VICUNA_TEMPLATE
from helpers.models import model_with_tokenizer
from helpers.scripted_server import CODE_ANSWER, scripted_server

MESSAGES = [{"role": "user", "content": "Tell me a long story"}]
PARAMS = SamplingParams(temperature=0, max_tokens=16)


class EndlessSource(ChatSource):
    """Two deltas, then an answer that never ends (a long request); records how its stream ended."""

    model_name = "endless"
    max_model_len = 100

    def __init__(self, fail_with: BaseException | None = None) -> None:
        self.fail_with = fail_with
        self.streaming = threading.Event()
        self.ended: str | None = None

    async def count_tokens(self, messages):
        return 7 * len(messages)

    async def stream(self, messages, params):
        try:
            yield "first "
            yield "second "
            if self.fail_with is not None:
                raise self.fail_with
            self.streaming.set()
            await asyncio.sleep(60)
            yield "never"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        except GeneratorExit:
            self.ended = "closed"
            raise
        finally:
            self.ended = self.ended or "finished"


def test_closing_the_sync_stream_cancels_the_async_stream():
    endless = EndlessSource()
    source = SyncChatSource(endless)
    try:
        assert source.count_tokens(MESSAGES) == 7 and source.max_model_len == 100 and source.model_name == "endless"
        assert source.scale_for(10) is None and source.is_idle() is None
        deltas = source.stream(MESSAGES, PARAMS)
        assert [next(deltas), next(deltas)] == ["first ", "second "]
        assert endless.streaming.wait(10)
        deltas.close()
        assert endless.ended == "cancelled"  # already when close() returns
    finally:
        source.close()


def test_ctrl_c_while_the_sync_stream_waits_cancels_the_async_stream():
    """SIGINT in the main thread while it waits for the next delta, as Ctrl-C in the terminal chat."""
    endless = EndlessSource()
    source = SyncChatSource(endless)
    shown = []
    try:

        def press_ctrl_c():
            if endless.streaming.wait(10):
                time.sleep(0.2)  # the main thread is waiting for the next delta by now
                os.kill(os.getpid(), signal.SIGINT)

        deltas = source.stream(MESSAGES, PARAMS)
        threading.Thread(target=press_ctrl_c).start()
        with pytest.raises(KeyboardInterrupt):
            for delta in deltas:
                shown.append(delta)
        assert shown == ["first ", "second "]
        assert endless.ended == "cancelled"
    finally:
        source.close()


def test_an_error_of_the_async_stream_reaches_the_reader_after_what_came_before():
    source = SyncChatSource(EndlessSource(fail_with=ChatSourceError("the answer broke off: gone")))
    shown = []
    try:
        with pytest.raises(ChatSourceError, match="^the answer broke off: gone$"):
            for delta in source.stream(MESSAGES, PARAMS):
                shown.append(delta)
        assert shown == ["first ", "second "]
    finally:
        source.close()


def test_stopping_an_answer_in_process_leaves_the_engine_idle(tmp_path):
    llm = LLM(
        str(model_with_tokenizer("llama", tmp_path)),
        dtype="float32",
        device="cpu",
        show_progress=False,
        max_model_len=1024,
        allow_long_max_model_len=True,
    )
    engine = AsyncLLMEngine(llm.engine, idle_wait=0.05)
    source = SyncChatSource(EngineSource(engine, VICUNA_TEMPLATE, "tiny", owns_engine=True))
    try:
        used = source.count_tokens(MESSAGES)
        assert used > 5 and source.scale_for(used + 1) == llm.engine.scale_for_length(used + 1)
        deltas = source.stream(MESSAGES, SamplingParams(temperature=0, max_tokens=900, ignore_eos=True))
        assert next(deltas) and next(deltas)
        deltas.close()
        deadline = time.monotonic() + 10
        while not source.is_idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert source.is_idle()
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        with pytest.raises(ChatSourceError, match="role"):  # a bad conversation is one line, not a traceback
            list(source.stream([{"role": "robot", "content": "hi"}], PARAMS))
    finally:
        source.close()
    assert not engine.running  # the chat's own engine stops with its source


@pytest.mark.parametrize(
    "server,message",
    [
        (
            {"refuse": "temperature must be non-negative, got -1.0"},
            "the server refused the request: temperature must be non-negative, got -1.0",
        ),
        ({"break_off": "the engine stopped after an error"}, "the answer broke off: the engine stopped after an error"),
    ],
)
def test_a_server_that_refuses_or_breaks_off_is_one_line(server, message):
    with scripted_server(CODE_ANSWER, **server) as url:
        source = SyncChatSource(OpenAISource(url, None, None))
        try:
            assert source.model_name == "scripted" and source.max_model_len == 4096
            assert source.count_tokens(MESSAGES) == 12  # the server's /tokenize
            with pytest.raises(ChatSourceError) as raised:
                list(source.stream(MESSAGES, PARAMS))
            assert str(raised.value) == message
        finally:
            source.close()


def test_an_unreachable_server_is_one_line():
    with pytest.raises(ChatSourceError, match=r"^cannot reach a server at http://127.0.0.1:9/v1: is it running\?$"):
        OpenAISource("http://127.0.0.1:9/v1/", None, None)
