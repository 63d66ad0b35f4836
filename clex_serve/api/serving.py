"""What the chat and completion handlers share: model and context checks, engine errors as HTTP errors,
running a request to its end while watching for a client that goes away, SSE framing, request logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request

from clex_serve.api.context_overflow import context_overflow, overflow_of
from clex_serve.api.errors import APIError, invalid
from clex_serve.api.metrics import ServerMetrics
from clex_serve.engine.async_engine import AsyncLLMEngine
from clex_serve.engine.errors import EngineDeadError, EngineShutdownError, QueueFullError
from clex_serve.engine.input_processor import PromptTooLongError
from clex_serve.engine.outputs import RequestOutput

logger = logging.getLogger("clex_serve.api")

# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL = 0.2

# The status a streamed request's log line gives for how it ended (the HTTP status was 200 from its start):
# 499, nginx's "client closed request", for a client that went away.
STREAM_STATUS = {"finished": 200, "aborted": 499, "failed": 500}


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its requests were aborted."""


class ServingContext:
    def __init__(self, engine: AsyncLLMEngine, served_model_name: str, chat_template: str | None,
                 metrics: ServerMetrics) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.chat_template = chat_template
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.family = engine.model_config.family

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.served_model_name}`",
                           param="model", code="model_not_found")

    def check_engine(self) -> None:
        if self.engine.dead:
            raise APIError(503, "the engine stopped after an error; restart the server", code="engine_dead")

    def check_request(self, body, request_id: str) -> None:
        """What every generation request passes first: the model, the engine, parameters this server does not
        implement (refused, naming them), and fields the API does not have (ignored, with one log line)."""
        self.check_model(body.model)
        self.check_engine()
        refused = body.unsupported()
        if refused:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        unknown = body.unknown_fields()
        if unknown:
            logger.info("request %s: ignoring fields that are not part of the API: %s", request_id, ", ".join(unknown))

    def output_budget(self, requested: int | None, prompt_len: int, prompt_param: str) -> int:
        """The output budget: what was asked, or the rest of the context; a prompt and budget that do not fit
        the context are refused in one shape, naming the prompt (or the messages) and both numbers."""
        room = self.max_model_len - prompt_len
        asked = requested if requested is not None else 1
        if asked > room:
            raise context_overflow(self.max_model_len, prompt_len, asked, prompt_param, requested is not None)
        return requested if requested is not None else room

    @staticmethod
    def engine_error(error: Exception) -> APIError:
        """Any error met while serving a request, as the HTTP error it answers with."""
        if isinstance(error, APIError):
            return error
        if isinstance(error, QueueFullError):
            return APIError(429, str(error), code="queue_full", headers={"Retry-After": "1"})
        if isinstance(error, (EngineDeadError, EngineShutdownError)):
            return APIError(503, str(error), code="engine_unavailable")
        if isinstance(error, PromptTooLongError):
            return overflow_of(error, "prompt")
        if isinstance(error, ValueError):
            return invalid(error)
        return APIError(500, f"generation failed: {error}", code="generation_failed")

    async def first_output(self, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        """The stream's first output, with submission errors (bad request, full queue) as HTTP errors, so
        that they are answered before a streaming response has started."""
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine returned no output", code="generation_failed") from None
        except Exception as error:
            raise self.engine_error(error) from None

    async def run_to_end(self, streams: list[AsyncIterator[RequestOutput]], raw_request: Request
                         ) -> list[RequestOutput]:
        """Each stream's final output. A client that disconnects meanwhile cancels them all, which aborts
        their requests and frees their KV blocks at once."""
        async def last(stream):
            output = await self.first_output(stream)
            async for output in stream:
                pass
            return output

        tasks = [asyncio.ensure_future(last(stream)) for stream in streams]
        try:
            while True:
                done, pending = await asyncio.wait(tasks, timeout=_DISCONNECT_POLL,
                                                   return_when=asyncio.FIRST_EXCEPTION)
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

    def log(self, request_id: str, status: int, prompt_tokens: int, output_tokens: int,
            time_to_first_token: float | None, started: float) -> None:
        ttft = f"{time_to_first_token * 1000:.0f}ms" if time_to_first_token is not None else "-"
        logger.info("request %s status %d prompt_tokens %d output_tokens %d ttft %s duration %.0fms",
                    request_id, status, prompt_tokens, output_tokens, ttft, (time.monotonic() - started) * 1000)


def prompt_logprobs_json(ctx: "ServingContext", output: RequestOutput) -> list | None:
    """vLLM's ``prompt_logprobs`` field: per prompt position (the first has none), token id -> logprob."""
    if output.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(token_id): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": ctx.tokenizer.decode([token_id])}
             for token_id, lp in entry.items()}
            for entry in output.prompt_logprobs]


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
