"""OpenAI-shaped errors: one body, ``{"error": {"message", "type", "param", "code"}}``, for every failure."""

from __future__ import annotations

import json
import re

from fastapi.responses import JSONResponse

from clex_serve.api.protocol import ErrorInfo, ErrorResponse

# The OpenAI API's error types by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        error = ErrorInfo(message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param,
                          code=self.code)
        return ErrorResponse(error=error).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_data(self) -> str:
        return json.dumps(self.body())


# Parameter names the engine's messages start with: "temperature must be ...", "stop_token_ids: ...".
_PARAM = re.compile(r"^([a-z_]+)(?: must|:| \()")


def invalid(error: ValueError, param: str | None = None) -> APIError:
    """A 400 for a value the engine refused; its message names the parameter, which becomes ``param``."""
    message = str(error)
    if param is None:
        match = _PARAM.match(message)
        param = match.group(1) if match else None
    return APIError(400, message, param=param)
