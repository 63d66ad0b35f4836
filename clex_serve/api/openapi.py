"""What ``openapi.json`` says of each route: its error responses (OpenAI's error body, with the statuses the
route can send), event streams where it streams, and nothing it never sends.

FastAPI lists a 422 with its own validation-error body on every route with a body; this server answers a
body that does not validate with a 400 in the OpenAI shape instead, so that entry is removed.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from clex_serve.api.responses import ErrorResponse

_ERRORS = {
    400: "The request is invalid: a parameter out of range, an unsupported parameter, a prompt too long "
    "for the context (code context_length_exceeded)",
    401: "A missing or wrong API key (when the server has one)",
    404: "Another model than the one served",
    413: "A request body over the server's limit",
    429: "Too many requests waiting (Retry-After says when to try again)",
    503: "The engine is not running",
}


def error_responses(*statuses: int) -> dict[int, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


GENERATION_ERRORS = error_responses(400, 401, 404, 413, 429, 503)
BODY_ERRORS = error_responses(400, 401, 404, 413)  # tokenize and detokenize: no engine work


# One server-sent event: its data a JSON chunk of the answer, an OpenAI error body, or "[DONE]" at the end.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk, an error body, or [DONE]"},
        "event": {"type": "string"},
        "id": {"type": "string"},
    },
}


def streaming_response(model) -> dict[int, dict[str, Any]]:
    """A 200 that is JSON, or an event stream of JSON chunks (each a ``data:`` line, then ``data: [DONE]``)
    when the request asked for ``stream``."""
    return {
        200: {
            "model": model,
            "description": "The answer, or with stream: true an event stream of chunks",
            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
        }
    }


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe only the responses the server sends."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
