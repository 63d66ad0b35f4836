"""A bound on request bodies, enforced before a body is read whole: a 413 in the OpenAI error shape.

A body whose ``Content-Length`` is over the limit is answered at once, unread; a chunked body is counted as
it arrives and refused as soon as it passes the limit. Without this a 50 MB body was read, parsed and
tokenized whole (minutes of CPU, gigabytes kept) before its prompt was found too long.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

from clex_serve.api.errors import APIError


def _message(limit: int) -> str:
    return (
        f"the request body is larger than this server's limit of {limit} bytes (the limit is sized from the "
        f"longest prompt the model can read; --max-request-body-bytes changes it)"
    )


class _TooLarge(HTTPException):
    """Raised from ``receive`` while the app reads the body: an HTTPException, so that FastAPI passes it on to
    the app's handler (which answers in the OpenAI shape) instead of calling it a parse error."""

    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, _message(limit))


def _too_large(limit: int) -> APIError:
    return APIError(413, _message(limit), code=_TooLarge.code)


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _too_large(self.max_bytes).response()(scope, receive, send)
            return
        if length is not None:
            # Within the limit, and the server holds the body to its Content-Length: nothing to count. The
            # streamed answer's chunks pass through untouched (no wrapper per chunk on the hot path).
            await self.app(scope, receive, send)
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:  # where no handler answered it: the body is read before any response starts
            await _too_large(self.max_bytes).response()(scope, receive, send)
