"""What :mod:`service.client` returns for a restore, and how each kind of answer becomes it.

A plain answer is the PNG, with ``X-Request-ID`` and ``Server-Timing`` headers. An answer asked
for with ``Accept: text/event-stream`` is a stream of Server-Sent Events::

    : restoring                                       (comments, and ": keep-alive" in silences)
    event: progress
    data: {"done": 0, "total": 63}                    ("eta_s" too, once the pace is measured)
    ...
    event: result
    data: {"png_base64", "width", "height", "request_id", "timings"}    (or one "error" event)

Both give the same :class:`RestoreResult`, and an ``error`` event the same :class:`ServiceError`
as the error response it stands for. :class:`RestoreEvents` reads a stream line by line and does
no I/O of its own, so that the sync and the async client share it.

Import these from :mod:`service.client`, which re-exports them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from .client_errors import REQUEST_ID_HEADER, ServiceError, error_for_status, error_from_response

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class RestoreResult:
    png: bytes
    request_id: str
    timings: dict[str, float]  # milliseconds per step (decode, queue, inference, encode, total)
    attempts: int = 1  # requests sent, retries included


@dataclass(frozen=True)
class Progress:
    """How far the service has got with one image: ``done`` of its ``total`` tiles, and its
    estimate of the seconds left, None until it has measured the pace. ``done`` is 0 in the first
    report, once the image is decoded and cut, and ``total`` in the last."""

    done: int
    total: int
    eta_s: float | None = None


ProgressCallback = Callable[[Progress], None]


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``"queue;dur=1.5, total;dur=9"`` -> ``{"queue": 1.5, "total": 9.0}``; entries without a
    duration are left out."""
    timings: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if name and key.strip().lower() == "dur":
                try:
                    timings[name] = float(number.strip().strip('"'))
                except ValueError:
                    pass
    return timings


def plain_result(response: httpx.Response) -> RestoreResult:
    """The result of a PNG answer (its body read); an error answer's :class:`ServiceError` is raised."""
    if not response.is_success:
        raise error_from_response(response)
    if not response.content.startswith(PNG_SIGNATURE):
        # A proxy's login page or another server at this address, answering 200 all the same.
        media_type = response.headers.get("Content-Type", "no Content-Type")
        raise ServiceError(f"the answer from {response.url} is {media_type}, not a PNG: is this the service?",
                           code="not_a_png", status=response.status_code)
    return RestoreResult(png=response.content, request_id=response.headers.get(REQUEST_ID_HEADER, ""),
                         timings=parse_server_timing(response.headers.get("Server-Timing")))


def is_event_stream(response: httpx.Response) -> bool:
    # Errors refused before the stream starts are ordinary JSON answers; and a service that
    # ignores the Accept header still answers with the PNG, a result without progress.
    media_type = response.headers.get("Content-Type", "").partition(";")[0]
    return response.is_success and media_type.strip().lower() == EVENT_STREAM


class RestoreEvents:
    """One answer's event stream, fed a line at a time: calls ``progress`` for each ``progress``
    event and keeps the ``result`` or ``error`` event that ends the stream.

    Lines come from httpx's line splitting, which also breaks at characters the event-stream
    format does not (form feed, U+2028, ...); the service writes its events as ASCII-only JSON,
    where none of those can occur.
    """

    def __init__(self, response: httpx.Response, progress: ProgressCallback):
        self._request_id = response.headers.get(REQUEST_ID_HEADER)
        self._progress = progress
        self._name = ""
        self._data: list[str] = []
        self._outcome: RestoreResult | ServiceError | None = None

    def feed(self, line: str) -> bool:
        """Take the next line, without its line break; True once the stream's outcome is known."""
        if line:
            # A comment (":"-first) has the empty field name; `id` and `retry` do not matter to a
            # restore, which cannot be resumed on another connection.
            field, _, value = line.partition(":")
            if field == "event":
                self._name = value.removeprefix(" ")
            elif field == "data":
                self._data.append(value.removeprefix(" "))
            return False
        name, data = self._name, self._data
        self._name, self._data = "", []
        if data:
            event = self._parse(name, "\n".join(data))
            if isinstance(event, Progress):
                self._progress(event)  # outside _parse, whose errors all mean a malformed event
            elif event is not None:
                self._outcome = event
        return self._outcome is not None

    def outcome(self) -> RestoreResult:
        """The result; an ``error`` event's :class:`ServiceError` is raised, and a stream that
        ended before either raises the protocol error of an answer cut short."""
        if self._outcome is None:
            raise httpx.RemoteProtocolError("the event stream ended before the restore's result")
        if isinstance(self._outcome, ServiceError):
            raise self._outcome
        return self._outcome

    def _parse(self, name: str, data: str) -> Progress | RestoreResult | ServiceError | None:
        try:
            fields = json.loads(data)
            if name == "progress":
                eta_s = fields.get("eta_s")
                return Progress(int(fields["done"]), int(fields["total"]), None if eta_s is None else float(eta_s))
            if name == "result":
                png = base64.b64decode(fields["png_base64"], validate=True)
                if not png.startswith(PNG_SIGNATURE):
                    return ServiceError("the result event carries no PNG: is this the service?", code="not_a_png",
                                        status=200, request_id=self._request_id)
                return RestoreResult(png=png, request_id=str(fields["request_id"]),
                                     timings={str(step): float(ms) for step, ms in fields["timings"].items()})
            if name == "error":
                detail = fields["error"]
                retry_after = detail.get("retry_after_s")
                return error_for_status(int(detail["status"]), str(detail["code"]), str(detail["message"]),
                                        request_id=self._request_id,
                                        retry_after=None if retry_after is None else float(retry_after))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise httpx.RemoteProtocolError(f"the service sent a malformed {name or 'message'} event: {exc!r}") from exc
        return None  # an event this client does not know: a later service's addition
