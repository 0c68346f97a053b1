"""ApiError and the handlers that answer every error, of every endpoint, in OpenAI's error JSON shape:
``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from moe_lightning.serving.schemas import ErrorResponse

logger = logging.getLogger(__name__)


def documented_errors(*statuses: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these (status, description) pairs, each with the :class:`ErrorResponse` body."""
    return {status: {"model": ErrorResponse, "description": description} for status, description in statuses}


ERROR_RESPONSES = documented_errors(
    (400, "malformed JSON, or arguments the model can't take"), (401, "missing or invalid API key"),
    (403, "the key lacks the user role"), (413, "too many or too long prompts, or too large a body"),
    (422, "a field out of its bounds"), (429, "the key's rate limit or the queue is full (see Retry-After)"),
    (503, "shutting down, or the request timed out (see Retry-After)"),
)
"""The errors of every generation endpoint."""

_MAX_SHOWN_ERRORS = 5
_MAX_SHOWN_INPUT = 80


class ApiError(HTTPException):
    """An answer other than success: its HTTP status, a message naming the bad value, and the request field at fault."""

    def __init__(
        self, status_code: int, message: str, param: str | None = None, code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, dict(headers) if headers else None)
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status_code, self.detail, self.param, self.code)


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON, its ``type`` chosen by the status."""
    return {"error": {"message": message, "type": _error_type(status_code), "param": param, "code": code}}


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A pydantic/FastAPI validation failure as one ApiError: 400 for a body that is not JSON, 422 otherwise; the
    message names each bad field (dotted, without the ``body`` prefix) and the value it got, ``param`` the first
    one's request parameter."""
    if any(error["type"] == "json_invalid" for error in errors):
        reason = next(error for error in errors if error["type"] == "json_invalid").get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    described = [_describe(error) for error in errors[:_MAX_SHOWN_ERRORS]]
    more = f" (and {len(errors) - _MAX_SHOWN_ERRORS} more)" if len(errors) > _MAX_SHOWN_ERRORS else ""
    top_level_field = _field(errors[0]).split(".")[0]  # the request parameter, as OpenAI's `param` names it
    return ApiError(422, "; ".join(described) + more, param=top_level_field or None, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Answer ApiError, FastAPI's HTTP and validation errors, and unexpected exceptions as OpenAI's error JSON."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if isinstance(error, ApiError):
            body = error.body()
        elif isinstance(error.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body" of bad UTF-8
            cause = error.__cause__
            body = error_body(400, f"the request body is not valid UTF-8: {cause.reason} at byte {cause.start}",
                              code="invalid_json")
        else:
            body = error_body(error.status_code, str(error.detail))
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        api_error = validation_error(error.errors())
        return JSONResponse(api_error.body(), status_code=api_error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error (logged on the server)"), status_code=500)


def _describe(error: Mapping[str, Any]) -> str:
    shown = repr(error.get("input"))
    if len(shown) > _MAX_SHOWN_INPUT:
        shown = shown[:_MAX_SHOWN_INPUT] + "..."
    return f"{_field(error) or 'body'}: {error['msg']} (got {shown})"


def _field(error: Mapping[str, Any]) -> str:
    location = list(error.get("loc", ()))
    if location[:1] == ["body"]:
        location = location[1:]
    return ".".join(str(part) for part in location)


def _error_type(status_code: int) -> str:
    if status_code == 401:
        return "authentication_error"
    if status_code == 403:
        return "permission_error"
    if status_code == 429:
        return "rate_limit_error"
    if status_code >= 500:
        return "server_error"
    return "invalid_request_error"
