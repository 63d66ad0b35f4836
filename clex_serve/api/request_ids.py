"""Request ids: the client's ``X-Request-Id`` (or a new one) on every request and response, and a log line for
the routes that do not log their own.

A plain ASGI middleware rather than Starlette's ``@app.middleware("http")``: that one passes every chunk of a
streamed body through an extra memory stream and task, which at 16 token streams cost the event loop about
a third of its time -- CPU taken from the engine's threads on a small machine.
"""

from __future__ import annotations

import logging
import time
import uuid

logger = logging.getLogger("clex_serve.api")

HEADER = b"x-request-id"


class RequestIdMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = next((value.decode("latin-1") for name, value in scope["headers"] if name == HEADER), "")
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id  # read as request.state.request_id
        started, status = time.monotonic(), 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != HEADER]
                message = {**message, "headers": headers + [(HEADER, request_id.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not scope["path"].endswith("completions"):  # generation routes log their own line, with tokens
                logger.info(
                    "request %s %s %s status %d duration %.0fms",
                    request_id,
                    scope["method"],
                    scope["path"],
                    status,
                    (time.monotonic() - started) * 1000,
                )
