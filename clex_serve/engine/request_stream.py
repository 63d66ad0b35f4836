"""One request's outputs on their way from the engine thread to an asyncio consumer.

The engine thread puts; the consumer awaits. At most one output is pending: a newer one is merged into it
(deltas concatenate, cumulative outputs replace), so a consumer that falls behind holds one output that
carries everything it has not read, never a queue that grows with every step. The engine thread touches
the event loop only when the stream goes from empty to non-empty.
"""

from __future__ import annotations

import asyncio
import threading

from clex_serve.engine.outputs import RequestOutput, merge_outputs


class RequestStream:
    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self.closed = False  # a final output or an error was put: nothing follows

    @property
    def num_pending(self) -> int:
        with self._lock:
            return int(self._pending is not None) + int(self._error is not None)

    def put(self, output: RequestOutput) -> None:
        """From any thread."""
        with self._lock:
            if self.closed:
                return
            was_empty = self._pending is None and self._error is None
            self._pending = output if self._pending is None else merge_outputs(self._pending, output)
            self.closed = output.finished
        if was_empty:
            self._wake()

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (after any output still pending). From any thread."""
        with self._lock:
            if self.closed:
                return
            was_empty = self._pending is None and self._error is None
            self._error = error
            self.closed = True
        if was_empty:
            self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:
            pass  # the consumer's loop is closed: nobody is waiting any more

    async def get(self) -> RequestOutput:
        """The next output (everything since the previous ``get``); raises the error the stream ended with."""
        while True:
            with self._lock:
                output, self._pending = self._pending, None
                error = self._error if output is None else None
                if output is None and error is None:
                    self._ready.clear()
            if output is not None:
                return output
            if error is not None:
                raise error
            await self._ready.wait()
