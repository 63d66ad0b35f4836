"""The asyncio engine for servers: stream each request's output as it grows, abort on demand.

One background thread runs ``LLMEngine.step`` in a loop (torch releases the GIL, so the event loop stays
responsive); outputs are handed to each request's ``asyncio.Queue`` on the loop. Requests are added and
aborted through a lock, between steps.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

from clex_serve.engine.engine_config import EngineConfig
from clex_serve.engine.llm_engine import LLMEngine
from clex_serve.engine.outputs import RequestOutput
from clex_serve.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="clex-serve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that advanced it; the last one has ``finished``."""
        request_id = request_id or f"async-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(prompt, params, request_id)  # ValueError: refused before any work
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away (client disconnect, cancellation): free the blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort_request(request_id)
            self._queues.pop(request_id, None)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()  # before looking for work, so a request added meanwhile wakes the wait below
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                try:
                    outputs = self.engine.step() if busy else []
                except Exception as error:  # an engine failure ends the requests in flight, not the server
                    self._fail_all(error)
                    continue
                deliveries = [(self._queues.get(output.request_id), output) for output in outputs]
                for output in outputs:
                    if output.finished:
                        self._queues.pop(output.request_id, None)
            for target, output in deliveries:
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, output)
            if not busy:
                self._wake.wait(timeout=0.5)

    def _fail_all(self, error: Exception) -> None:
        for request_id, (loop, queue) in list(self._queues.items()):
            self.engine.abort_request(request_id)
            loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"generation failed: {error}"))
        self._queues.clear()
