"""A ``ChatSource`` for synchronous callers (the terminal chat): the async source runs on an event loop in a
thread of its own, and its answer arrives as a plain iterator."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterator

from clex_serve.chat.source import ChatSource
from clex_serve.sampling_params import SamplingParams


class SyncChatSource:
    def __init__(self, source: ChatSource) -> None:
        self.source = source
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="clex-chat-loop", daemon=True)
        self._loop_thread.start()

    @property
    def model_name(self) -> str:
        return self.source.model_name

    @property
    def max_model_len(self) -> int | None:
        return self.source.max_model_len

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def count_tokens(self, messages: list[dict]) -> int | None:
        return self._run(self.source.count_tokens(messages))

    def scale_for(self, num_tokens: int) -> int | None:
        return self.source.scale_for(num_tokens)

    def is_idle(self) -> bool | None:
        return self.source.is_idle()

    def stream(self, messages: list[dict], params: SamplingParams, close_timeout: float = 10.0) -> Iterator[str]:
        """The answer's text deltas. Closing this iterator (Ctrl-C while it waits raises in it, which closes it
        too) cancels the async stream on the loop thread, which frees the request's work, and waits up to
        ``close_timeout`` seconds for that to be done."""
        deltas: queue.Queue = queue.Queue()  # Queue, not SimpleQueue: its get() gives way to Ctrl-C
        end = object()
        closed = threading.Event()

        async def pump():
            try:
                async with contextlib.aclosing(self.source.stream(messages, params)) as stream:
                    async for delta in stream:
                        deltas.put(delta)
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread
                deltas.put(error)
            finally:
                deltas.put(end)
                closed.set()

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                item = deltas.get()
                if item is end:
                    return
                if isinstance(item, asyncio.CancelledError):
                    return
                if isinstance(item, BaseException):
                    raise item
                if item:
                    yield item
        finally:
            if not closed.is_set():
                future.cancel()  # the pump's task is cancelled, which closes the source's stream
                closed.wait(close_timeout)

    def close(self) -> None:
        try:
            self._run(self.source.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(timeout=10)
