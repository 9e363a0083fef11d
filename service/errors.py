"""Errors as the API reports them: one JSON shape, one table from domain errors to HTTP.

Every error response is ``{"error": {"code", "message"}}``. Code below the HTTP layer raises its
own exceptions (an undecodable image, a full queue, a passed deadline); :func:`as_service_error`
is the one place that says which status and code each becomes.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .batching import DeadlineExceeded, QueueClosed, QueueFull, TooManyTiles
from .imaging import ImageError
from .memory import OverBudget

__all__ = ["ServiceError", "ErrorBody", "error_response", "install_error_handlers", "as_service_error",
           "not_ready", "timed_out", "NOT_READY_RETRY_AFTER_S"]

log = logging.getLogger(__name__)

# What a client should wait before asking again while models load or the service drains.
NOT_READY_RETRY_AFTER_S = 5
_CODE_BY_STATUS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                   415: "unsupported_media_type", 422: "validation_error", 500: "internal_error",
                   503: "unavailable", 504: "timeout"}


class ServiceError(StarletteHTTPException):
    """An error with its API code; rendered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code", examples=["invalid_image"])
    message: str = Field(description="what went wrong, for people")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def not_ready(reason: str) -> ServiceError:
    return ServiceError(503, "not_ready", reason, {"Retry-After": str(NOT_READY_RETRY_AFTER_S)})


def timed_out(limit_s: float) -> ServiceError:
    return ServiceError(504, "timeout", f"the image was not restored within {limit_s:g} s")


def as_service_error(error: Exception, request_timeout_s: float) -> ServiceError | None:
    """The API's answer to a domain error met while restoring; None for anything unexpected."""
    if isinstance(error, ImageError):
        return ServiceError(error.status_code, error.code, str(error))
    if isinstance(error, TooManyTiles):
        return ServiceError(413, "image_too_large", str(error))
    if isinstance(error, QueueFull):
        return ServiceError(503, "queue_full", f"{error}; retry later", {"Retry-After": str(error.retry_after_s)})
    if isinstance(error, QueueClosed):
        return not_ready(str(error))
    if isinstance(error, DeadlineExceeded):
        return timed_out(request_timeout_s)
    if isinstance(error, OverBudget):
        return ServiceError(503, "over_capacity", f"{error}; retry later", {"Retry-After": str(error.retry_after_s)})
    return None


def _note_in_log(request: Request, code: str) -> None:
    entry = getattr(request.state, "log_entry", None)
    if entry is not None:
        entry["error"] = code


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if isinstance(exc.__cause__, ClientDisconnect):
        # FastAPI reports a client that left while its upload arrived as a body it could not
        # parse (400). Nobody reads this answer; the log and metrics say 499, as for a client
        # that leaves while its image is restored.
        _note_in_log(request, "client_disconnected")
        return Response(status_code=499)
    code = getattr(exc, "code", None) or _CODE_BY_STATUS.get(exc.status_code, "http_error")
    _note_in_log(request, code)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 413 and not isinstance(exc, ServiceError):
        # Starlette's streaming body limit, hit by a body without Content-Length.
        limit = request.app.state.service.settings.max_upload_bytes
        message = f"the request body is larger than the limit of {limit} bytes"
    headers = exc.headers
    allowed = headers.get("Allow", "").split(", ") if headers else []
    if exc.status_code == 405 and "GET" in allowed and "HEAD" not in allowed:
        headers = {**headers, "Allow": headers["Allow"] + ", HEAD"}  # middleware.HeadAsGet answers it
    return error_response(exc.status_code, code, message, headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "path", "query"))
        problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid"))
    message = "; ".join(problems) or "the request is not valid"
    image_errors = [error for error in exc.errors() if error.get("loc", ())[-1:] == ("image",)]
    if any(isinstance(error.get("input"), str) for error in image_errors):
        # What curl sends for -F image=<photo.jpg (the file's content as a text field) or -F image=photo.jpg.
        message = ("the field 'image' came as text, not as a file: send the file itself, with a filename "
                   "(curl: -F image=@photo.jpg)")
    elif image_errors:
        message += " (send the image as a multipart/form-data file field named 'image')"
    _note_in_log(request, "validation_error")
    return error_response(422, "validation_error", message)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "-")
    log.error("unhandled error in request %s", request_id, exc_info=exc)
    _note_in_log(request, "internal_error")
    return error_response(500, "internal_error", f"internal error (request {request_id})")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
