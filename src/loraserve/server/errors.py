"""Errors in OpenAI's shape, and the mapping from what can go wrong to an HTTP status.

    {"error": {"message": "...", "type": "BadRequestError", "param": "top_p", "code": 400}}

Every handler raises APIError (or lets an engine error through); the handlers installed by
``install_error_handlers`` turn those, pydantic validation errors and Starlette's own HTTP
errors into that body, so a client never sees another shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraserve.server.async_engine import EngineDeadError, QueueFullError
from loraserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
_MAX_REPORTED = 3  # validation errors named in one message


class APIError(Exception):
    """An error to return as ``status`` with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        info = ErrorInfo(
            message=self.message,
            type=_TYPES.get(self.status, "Error"),
            param=self.param,
            code=self.status,
        )
        return ErrorResponse(error=info)

    def body_json(self) -> str:
        return self.body().model_dump_json()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def from_engine_error(error: Exception) -> APIError:
    """The APIError for an exception of AsyncEngine.add_request/add_adapter/remove_adapter.

    KeyError (unknown adapter) -> 404; ValueError (bad field, prompt too long, bad adapter)
    -> 400; QueueFullError -> 503 with Retry-After; EngineDeadError -> 503; else 500."""
    if isinstance(error, KeyError):
        return APIError(404, str(error.args[0]) if error.args else "not found")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    if isinstance(error, QueueFullError):
        return APIError(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error))
    logger.exception("unexpected error", exc_info=error)
    return APIError(500, f"internal error: {error!r}")


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 naming the offending fields of a pydantic validation error."""
    parts: list[str] = []
    param: str | None = None
    for err in errors[:_MAX_REPORTED]:
        if err["type"] == "json_invalid":
            return APIError(400, f"malformed JSON body: {err['msg']}")
        field = _field_path(err["loc"])
        param = param or field or None
        parts.append(f"{field}: {_message(err)}" if field else _message(err))
    more = len(errors) - _MAX_REPORTED
    suffix = f" (and {more} more)" if more > 0 else ""
    return APIError(400, "invalid request: " + "; ".join(parts) + suffix, param=param)


def _field_path(loc: Sequence[Any]) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; union member tags such
    as 'list[int]' are dropped."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in str(part) or str(part) in ("str", "int", "float", "bool", "dict"):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def _message(err: Mapping[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown or unsupported field"
    if err["type"] == "missing":
        return "field required"
    return str(err["msg"]).removeprefix("Value error, ")


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc.errors()).response()


async def _pydantic_validation(_: Request, exc: ValidationError) -> JSONResponse:
    return validation_error(exc.errors()).response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {exc!r}").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _pydantic_validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
