"""The errors :mod:`service.client` raises, and how an HTTP answer becomes one of them.

Import them from :mod:`service.client`, which re-exports every one.
"""

from __future__ import annotations

import email.utils
from datetime import datetime, timezone
from types import EllipsisType

import httpx

REQUEST_ID_HEADER = "X-Request-ID"


class ServiceError(Exception):
    """An error answered by the service (``status`` set) or met on the way to it (``status`` None).

    ``code`` is the API's machine-readable code (``invalid_image``, ``queue_full``, ...),
    ``message`` its sentence for people, ``request_id`` the id the service logged it under.
    """

    status: int | None = None  # each subclass's usual status; an instance may differ (None: no answer)

    def __init__(self, message: str, *, code: str, status: int | None | EllipsisType = ...,
                 request_id: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        if status is not ...:
            self.status = status
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        return f"{self.message} ({where}{self.code})"


class InvalidImage(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class PayloadTooLarge(ServiceError):
    """Over the byte limit (``payload_too_large``) or the pixel limit (``image_too_large``)."""

    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


class ValidationError(ServiceError):
    status = 422


class InternalError(ServiceError):
    status = 500


class Overloaded(ServiceError):
    """503 after the retries ran out: the queue stayed full (``queue_full``) or the models were
    not ready (``not_ready``)."""

    status = 503


class Timeout(ServiceError):
    """The service gave up on the image (504, ``timeout``), or no answer came within the client's
    own timeout (``status`` None, ``client_timeout``)."""

    status = 504


class ConnectionFailed(ServiceError):
    """The service could not be reached, or dropped the connection, on every attempt."""


_ERROR_BY_STATUS: dict[int, type[ServiceError]] = {
    cls.status: cls for cls in (InvalidImage, NotFound, PayloadTooLarge, UnsupportedMediaType, ValidationError,
                                InternalError, Overloaded, Timeout)}


def error_from_response(response: httpx.Response) -> ServiceError:
    request_id = response.headers.get(REQUEST_ID_HEADER)
    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        # Not the service's JSON: a proxy or load balancer in between answered.
        code = f"http_{response.status_code}"
        message = response.text.strip()[:300] or response.reason_phrase or f"HTTP {response.status_code}"
    return error_for_status(response.status_code, code, message, request_id=request_id,
                            retry_after=_retry_after_seconds(response.headers.get("Retry-After")))


def error_for_status(status: int, code: str, message: str, *, request_id: str | None = None,
                     retry_after: float | None = None) -> ServiceError:
    """The error the service means by ``status``, whether it came as a response or as an event."""
    cls = _ERROR_BY_STATUS.get(status, ServiceError)
    return cls(message, code=code, status=status, request_id=request_id, retry_after=retry_after)


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now; it may be a number of seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit alone takes "²", which float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
