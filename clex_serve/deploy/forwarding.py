"""An HTTP request as the ingress hands it to an engine replica, and the replica's side: the request run
through the single server's own FastAPI app, in process, its response coming back as ASGI messages.

The replicas serve every route with the app that ``clex-serve`` serves (``clex_serve.api.app.build_app``),
so errors, the API key, streaming and the request log are the single server's, not a copy of them. A
cancelled call (the client went away: Ray cancels the ingress's request and, with it, this one) becomes
the app's ``http.disconnect``, which aborts the request in the engine as it does behind uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from clex_serve.deploy.routing_hint import RoutingHint

logger = logging.getLogger("clex_serve.deploy")

# Every response names the replica that served it.
REPLICA_HEADER = "x-clex-replica"
# How long a cancelled request's app gets to see its disconnect and end on its own before it is cancelled.
_DISCONNECT_GRACE_S = 2.0


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None
    hint: RoutingHint | None = None  # for generation requests the router can place
    pinned_replica: str | None = None  # the ingress asks one replica (its /metrics, a pinned request)


def _scope(request: ForwardedRequest) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": list(request.headers),
        "client": request.client,
        "server": ("127.0.0.1", 0),
        "state": {},
    }


_DONE = object()


async def call_app(app, request: ForwardedRequest, replica_id: str) -> AsyncIterator[list[dict]]:
    """Run ``request`` through the ASGI ``app``; yield its response messages in batches (whatever has
    queued up since the last batch: a stream's chunks cost one Ray message each batch, not each token)."""
    queue: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REPLICA_HEADER.encode()]
            message = {**message, "headers": headers + [(REPLICA_HEADER.encode(), replica_id.encode())]}
        queue.put_nowait(message)

    task = asyncio.ensure_future(app(_scope(request), receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(_DONE))
    finished = started = False
    try:
        while not finished:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            finished = batch[-1] is _DONE
            messages = [message for message in batch if message is not _DONE]
            started = started or any(message["type"] == "http.response.start" for message in messages)
            if messages:
                yield messages
        error = task.exception()
        if error is not None:
            if not started:
                raise error
            # Starlette re-raises what it has already answered with a 500: the response is complete.
            logger.warning("request %s %s raised after its response: %r", request.method, request.path, error)
    finally:
        if not task.done():  # the caller went away: the app sees its client disconnect
            disconnected.set()
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_GRACE_S)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
