"""OpenAI-shaped errors: one body, ``{"error": {"message", "type", "param", "code"}}``, for every failure."""

from __future__ import annotations

import json
import re

from fastapi.responses import JSONResponse

from clex_serve.api.responses import ErrorInfo, ErrorResponse

# The OpenAI API's error types by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        error = ErrorInfo(
            message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param, code=self.code
        )
        return ErrorResponse(error=error).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_data(self) -> str:
        return json.dumps(self.body())


# Parameter names the engine's messages start with: "temperature must be ...", "stop_token_ids: ...".
_PARAM = re.compile(r"^([a-z_]+(?:\[\d+\]|\.[a-z_]+)*)(?: must|:| \()")


def invalid(error: ValueError, param: str | None = None) -> APIError:
    """A 400 for a value the engine refused; its message names the parameter, which becomes ``param``."""
    message = str(error)
    if param is None:
        match = _PARAM.match(message)
        param = match.group(1) if match else None
    return APIError(400, message, param=param)


# Location parts pydantic adds for the member of a union it tried ("str", "list[ContentPart]"); not fields.
_UNION_MEMBERS = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\]-]")


def _param_path(location) -> str | None:
    path = ""
    for part in location:
        if part == "body":
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_MEMBERS.search(str(part)):
            path += f".{part}" if path else str(part)
    return path or None


def _plain(message: str) -> str:
    return message.removeprefix("Value error, ")


def validation_error(errors: list[dict]) -> APIError:
    """A 400 for a body that does not match its schema, naming the first bad parameter. Where a value matches
    no member of a union, the members' complaints are joined ("a valid string or a valid list")."""
    if not errors:
        return APIError(400, "the body is not a valid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg', ''))}")
    param = _param_path(first.get("loc", ()))
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the body must be a JSON object, sent with Content-Type: application/json")
    if first.get("type") == "missing":
        if param is None:
            return APIError(400, "the body is missing: send a JSON object")
        return APIError(400, f"{param}: this parameter is required", param=param)
    same_place = [error for error in errors if _param_path(error.get("loc", ())) == param]
    # A check of our own (a value error: a lone surrogate, say) says more than the union's other members.
    same_place = [error for error in same_place if error.get("type") == "value_error"] or same_place
    # Where a value has a member's type but breaks its bounds, the bound is the news, not the other types.
    same_place = [error for error in same_place if not error.get("type", "").endswith("_type")] or same_place
    complaints = []
    for error in same_place:
        if _plain(error.get("msg", "")) not in complaints:
            complaints.append(_plain(error.get("msg", "invalid value")))
    message = complaints[0] + "".join(" or " + c.removeprefix("Input should be ") for c in complaints[1:])
    return APIError(400, f"{param or 'body'}: {message}", param=param)
