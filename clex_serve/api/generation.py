"""What every generation route does with its engine streams once the request is accepted: run them to the
end (watching for a client that goes away) or stream them as server-sent events, and end each request with
its metrics and one log line. The chat and completion handlers only say how outputs become JSON."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from clex_serve.api.errors import APIError
from clex_serve.api.serving import ServingContext
from clex_serve.engine.outputs import RequestMetrics, RequestOutput

# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL = 0.2

# The status a streamed request's log line gives for how it ended (the HTTP status was 200 from its start):
# 499, nginx's "client closed request", for a client that went away.
STREAM_STATUS = {"finished": 200, "aborted": 499, "failed": 500}


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its requests were aborted."""


async def first_output(ctx: ServingContext, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The stream's first output, with submission errors (bad request, full queue) as HTTP errors, so
    that they are answered before a streaming response has started."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the engine returned no output", code="generation_failed") from None
    except Exception as error:
        raise ctx.engine_error(error) from None


async def run_to_end(
    ctx: ServingContext, streams: list[AsyncIterator[RequestOutput]], raw_request: Request
) -> list[RequestOutput]:
    """Each stream's final output. A client that disconnects meanwhile cancels them all, which aborts
    their requests and frees their KV blocks at once."""

    async def last(stream):
        output = await first_output(ctx, stream)
        async for newer in stream:
            output = newer
        return output

    tasks = [asyncio.ensure_future(last(stream)) for stream in streams]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=_DISCONNECT_POLL, return_when=asyncio.FIRST_EXCEPTION)
            if not pending or any(task.exception() for task in done if not task.cancelled()):
                break
            if await raw_request.is_disconnected():
                raise ClientDisconnected()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def sse(data: dict | str) -> str:
    return data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index of the stream, item) as items arrive from several async iterators."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for item in stream:
                await queue.put((index, item))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((index, error))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


# How a streamed answer is written: (each stream's first output, then every output as it arrives, with the
# index of its stream) -> the JSON chunks to send.
ChunkRenderer = Callable[[list[RequestOutput], AsyncIterator[tuple[int, RequestOutput]]], AsyncIterator[dict]]


@dataclass
class Generation:
    """One accepted generation request: its engine streams (one per prompt) and its accounting."""

    ctx: ServingContext
    request_id: str
    streams: list[AsyncIterator[RequestOutput]]
    prompt_lens: list[int]
    counts_tokens: bool = True  # False when the generated tokens are dropped (scoring a prompt)
    started: float = field(default_factory=time.monotonic)
    generated: int = 0
    last_metrics: RequestMetrics | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    def _count(self, output: RequestOutput) -> None:
        if self.counts_tokens:
            self.generated += sum(len(completion.token_ids) for completion in output.outputs)
        self.last_metrics = output.metrics

    def _end(self, outcome: str, status: int) -> None:
        self.ctx.metrics.request_ended(outcome, self.last_metrics, self.prompt_tokens, self.generated)
        ttft = self.last_metrics.time_to_first_token if self.last_metrics else None
        self.ctx.log(self.request_id, status, self.prompt_tokens, self.generated, ttft, self.started)

    async def whole(self, raw_request: Request, render: Callable[[list[RequestOutput]], dict]) -> JSONResponse:
        """Every stream to its end, then one JSON body; a client that leaves first gets nothing (499)."""
        try:
            outputs = await run_to_end(self.ctx, self.streams, raw_request)
        except ClientDisconnected:
            self._end("aborted", 499)
            return JSONResponse({}, status_code=499)
        for output in outputs:
            self._count(output)
        self._end("finished", 200)
        return JSONResponse(render(outputs))

    async def event_stream(
        self, render: ChunkRenderer, usage_chunk: Callable[[int], dict] | None, typed_events: bool = False
    ) -> EventSourceResponse:
        """The answer as server-sent events, then a usage chunk when asked (``usage_chunk``), then [DONE].
        Each stream's first output is awaited before the response starts, so that a request the engine
        refuses (a bad parameter, a full queue) is answered with its HTTP error instead of a stream.
        ``typed_events``: the Responses API's form, each event named by its ``type`` and no [DONE]."""
        try:
            firsts = [await first_output(self.ctx, stream) for stream in self.streams]
        except Exception:
            for stream in self.streams:
                await stream.aclose()
            raise

        async def replay_first(index):
            yield firsts[index]
            async for output in self.streams[index]:
                yield output

        async def counted():
            async for index, output in merge_streams([replay_first(i) for i in range(len(self.streams))]):
                self.ctx.metrics.observe_tokens(output.metrics)
                self._count(output)
                yield index, output

        async def events():
            outcome = "aborted"
            try:
                async for chunk in render(firsts, counted()):
                    yield {"event": chunk["type"], "data": sse(chunk)} if typed_events else sse(chunk)
                if usage_chunk is not None:
                    yield sse(usage_chunk(self.generated))
                outcome = "finished"
                if not typed_events:
                    yield "[DONE]"
            except Exception as error:  # an error mid-stream: an OpenAI error event, then the end
                outcome = "failed"
                error = self.ctx.engine_error(error)
                if typed_events:
                    data = {"type": "error", "code": error.code, "message": error.message, "param": error.param}
                    yield {"event": "error", "data": sse(data)}
                else:
                    yield error.sse_data()
            finally:
                for stream in self.streams:
                    await stream.aclose()
                self._end(outcome, STREAM_STATUS[outcome])

        return EventSourceResponse(events(), ping=15, headers={"X-Request-Id": self.request_id})
