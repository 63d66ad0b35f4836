"""The ingress deployment behind Ray Serve's HTTP proxy: it reads each request, works out where the router
should send it (the prompt's scale bucket and block hashes), and forwards it to an engine replica through a
deployment handle, streaming the replica's response back as it comes.

It answers nothing itself except what only it can: a 429 (the single server's body and ``Retry-After``) when
every replica is at ``max_ongoing_requests`` and Ray's queue is full; a 503 when no replica can take the
request; an error event ending a stream whose replica died; and ``/metrics``, every replica's series with
a ``replica`` label. Everything else is the replicas' app: the same routes, errors and API key as
``clex-serve`` alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import Response

from clex_serve.api.errors import APIError
from clex_serve.api.limits import default_max_body_bytes
from clex_serve.deploy.forwarding import REPLICA_HEADER, ForwardedRequest
from clex_serve.deploy.metrics_merge import merge_metrics
from clex_serve.deploy.routing_hint import ModelView, routing_hint

logger = logging.getLogger("clex_serve.deploy")

_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class ForwardedResponse(Response):
    """The replica's response, message by message. A replica that dies mid-stream ends an event stream with
    an OpenAI error event (as the single server ends a stream that fails) and any other body where it is."""

    def __init__(self, first: list[dict], stream) -> None:
        self.first, self.stream = first, stream
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        start = self.first[0]
        # Ray's proxy adds the request id itself (the client's X-Request-Id, or its own, which the replica got).
        start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"x-request-id"]
        event_stream = any(
            k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"]
        )
        ended = False
        try:
            for message in self.first:
                await send(message)
                ended = ended or (message["type"] == "http.response.body" and not message.get("more_body", False))
            try:
                async for messages in self.stream:
                    for message in messages:
                        await send(message)
                        ended = ended or (message["type"] == "http.response.body" and not message.get("more_body"))
            except Exception as error:  # noqa: BLE001 - the replica died (or failed) with the response under way
                logger.warning("replica failed mid-response: %s", type(error).__name__)
                if not ended:
                    body = b""
                    if event_stream:
                        failure = APIError(503, "the replica serving this request stopped", code="replica_failed")
                        body = f"data: {failure.sse_data()}\r\n\r\n".encode()
                    ended = True
                    await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            self.stream.cancel()  # a client that went away: the replica's request ends too


class OpenAIIngress:
    def __init__(self, engine, api_key: str | None = None, max_request_body_bytes: int | None = None) -> None:
        self.engine = engine
        self.api_key = api_key
        self.max_request_body_bytes = max_request_body_bytes
        self.view: ModelView | None = None

    async def _model_view(self) -> ModelView:
        if self.view is None:
            described = await self.engine.describe.remote()
            self.prefix_caching = described.pop("prefix_caching")
            self.view = ModelView(**described)
            # Made after the first call, so that it shares that handle's router (and its prefix tree).
            self.streams = self.engine.options(stream=True)
        return self.view

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        return secrets.compare_digest(given.encode(), self.api_key.encode())

    async def _body(self, request: Request, limit: int) -> bytes:
        """The body, read up to one byte past the limit: the replica's app answers a longer one with its 413."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                break
        return b"".join(chunks)

    async def __call__(self, request: Request) -> Response:
        try:
            view = await self._model_view()
        except _REPLICA_GONE as error:
            return _unavailable(error)
        limit = self.max_request_body_bytes or default_max_body_bytes(view.max_model_len)
        body = await self._body(request, limit)
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # an application under a route prefix: the app's own paths
            path = path[len(root) :] or "/"
        if path == "/metrics" and request.method == "GET":
            return await self._metrics(request)
        # Routing reads the prompt only for requests the replica will accept the key of; others go to the
        # least loaded replica, which answers them (401, 400, ...) as the single server does.
        hint = None
        if self.prefix_caching and self._authorized(request) and path.endswith("completions"):
            hint = await asyncio.to_thread(routing_hint, view, path, body)  # tokenizing: off the event loop
        forwarded = ForwardedRequest(
            request.method,
            path,
            request.url.query.encode(),
            tuple(request.scope["headers"]),
            body,
            tuple(request.client) if request.client else None,
            hint,
            request.headers.get(REPLICA_HEADER) or None,
        )
        return await self._forward(forwarded)

    async def _forward(self, forwarded: ForwardedRequest) -> Response:
        stream = self.streams.handle.remote(forwarded)
        try:
            first = await stream.__anext__()
        except BackPressureError as error:
            return APIError(
                429,
                f"every replica is busy and the queue is full: {error}",
                code="queue_full",
                headers={"Retry-After": "1"},
            ).response()
        except _REPLICA_GONE as error:
            return _unavailable(error)
        except StopAsyncIteration:
            return APIError(502, "the replica returned no response", code="replica_failed").response()
        except Exception as error:  # noqa: BLE001 - the replica failed before answering
            logger.warning("replica failed before answering: %r", error)
            return APIError(500, f"the replica failed: {type(error).__name__}", code="replica_failed").response()
        return ForwardedResponse(first, stream)

    async def _metrics(self, request: Request) -> Response:
        """Every replica's /metrics, each series labelled with its replica."""
        from clex_serve.deploy import live_routers

        router = live_routers.ROUTERS.get(self.engine.deployment_name)
        replicas = sorted(r.unique_id for r in router.curr_replicas) if router is not None else []

        async def scrape(replica_id: str) -> tuple[str, str] | None:
            forwarded = ForwardedRequest(
                "GET", "/metrics", b"", tuple(request.scope["headers"]), b"", None, None, replica_id
            )
            try:
                parts = [m async for batch in self.streams.handle.remote(forwarded) for m in batch]
            except _REPLICA_GONE:
                return None
            text = b"".join(m.get("body", b"") for m in parts if m["type"] == "http.response.body")
            return replica_id, text.decode()

        scraped = [s for s in await asyncio.gather(*(scrape(r) for r in replicas)) if s is not None]
        text = merge_metrics(scraped)
        decisions = getattr(router, "decisions", None)
        if decisions:  # how the router placed requests: prefix affinity against its fallbacks
            text += "# HELP clex_serve_router_decisions_total Requests routed, by the rule that placed them\n"
            text += "# TYPE clex_serve_router_decisions_total counter\n"
            text += "".join(
                f'clex_serve_router_decisions_total{{decision="{name}"}} {count}\n' for name, count in decisions.items()
            )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _unavailable(error: Exception) -> Response:
    return APIError(
        503,
        f"no replica could take the request: {type(error).__name__}",
        code="replica_unavailable",
        headers={"Retry-After": "1"},
    ).response()


def routing_decisions() -> str:
    """The routers' decision counts in this process, as JSON (for logs and the benchmark)."""
    from clex_serve.deploy import live_routers

    return json.dumps({name: router.decisions for name, router in live_routers.ROUTERS.items()})
