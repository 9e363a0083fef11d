"""A restore answered as Server-Sent Events: progress while it runs, then its result or its error.

Asked for with ``Accept: text/event-stream`` on the ordinary restore endpoint, so that it needs no
second request, no sticky session and no shared store behind a load balancer. The stream is::

    : restoring                                    (a comment; more of them while nothing else is sent)
    event: progress / data: {"done": 0, "total": 63}
    event: progress / data: {"done": 4, "total": 63, "eta_s": 71.2}
    ...
    event: result   / data: {"png_base64": ..., "width", "height", "request_id", "timings"}
 or event: error    / data: {"error": {"code", "message", "status"}}

Everything refused before the stream starts (unknown task, key, declared size, full queue,
validation) stays an ordinary HTTP error; from the first byte on the status is 200 and the
outcome is in the last event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import ServiceError
from .progress import ProgressSnapshot, RestoreProgress
from .state import Restored

__all__ = ["EVENT_STREAM", "PROGRESS_INTERVAL_S", "wants_event_stream", "restore_events", "result_event", "error_event",
           "EventStreamResponse", "until_disconnected"]

EVENT_STREAM = "text/event-stream"
# At most four progress events a second: a fast GPU finishes batches far more often than a
# person can read, and each event costs the client a parse and a repaint.
PROGRESS_INTERVAL_S = 0.25


def _media_ranges(accept: str) -> dict[str, float]:
    """An Accept header's media ranges (lower case) and their q-values; a malformed q counts as 0."""
    ranges: dict[str, float] = {}
    for media_range in accept.split(","):
        media_type, *parameters = (part.strip() for part in media_range.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media_type:
            ranges[media_type.lower()] = quality
    return ranges


def wants_event_stream(accept: str) -> bool:
    """Whether an Accept header asks for an event stream: it names one with q > 0, ranked at least
    as high as the PNG (``image/png``, else ``image/*``, else ``*/*``: the most specific range
    that covers it decides, as RFC 9110 says)."""
    ranges = _media_ranges(accept)
    stream = ranges.get(EVENT_STREAM, 0.0)
    png = next((ranges[name] for name in ("image/png", "image/*", "*/*") if name in ranges), 0.0)
    return stream > 0 and stream >= png


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def _progress_event(snapshot: ProgressSnapshot) -> bytes:
    data = {"done": snapshot.done, "total": snapshot.total}
    if snapshot.eta_s is not None:
        data["eta_s"] = round(snapshot.eta_s, 1)
    return _event("progress", data)


def result_event(restored: Restored, request_id: str, timings: dict[str, float]) -> bytes:
    """The ``result`` event: the same PNG bytes a plain request returns, and ``timings`` in ms."""
    return _event("result", {"png_base64": base64.b64encode(restored.png).decode("ascii"),
                             "width": restored.width, "height": restored.height, "request_id": request_id,
                             "timings": {name: round(seconds * 1000, 2) for name, seconds in timings.items()}})


def error_event(error: ServiceError) -> bytes:
    """The ``error`` event: the service's usual error body, with the status a plain request
    would have had (and, for a 503, the seconds to wait, as ``Retry-After`` would say)."""
    detail = {"code": error.code, "message": error.detail, "status": error.status_code}
    retry_after = (error.headers or {}).get("Retry-After")
    if retry_after is not None:
        detail["retry_after_s"] = int(retry_after)
    return _event("error", {"error": detail})


async def restore_events(work: asyncio.Future, progress: RestoreProgress, deadline: float, keepalive_s: float,
                         finished: Callable[[asyncio.Future], bytes]) -> AsyncIterator[bytes]:
    """The stream of one restore: keep-alives and progress until ``work`` is done, or cancelled
    once ``deadline`` (``time.monotonic()``) passes; then ``finished(work)`` gives the last event."""
    yield _comment("restoring")
    last_write = last_progress_at = time.monotonic()
    sent: ProgressSnapshot | None = None
    changed: asyncio.Future | None = None
    try:
        while True:
            snapshot = progress.snapshot()
            news = snapshot is not None and (sent is None or snapshot.done != sent.done)
            now = time.monotonic()
            # The first report and the last (every tile done) go out at once; those between wait their turn.
            if news and (sent is None or progress.complete or now - last_progress_at >= PROGRESS_INTERVAL_S):
                sent, last_progress_at = snapshot, now
                yield _progress_event(snapshot)
                last_write = time.monotonic()
                continue
            if work.done():
                break
            if now >= deadline:
                work.cancel()
                await asyncio.wait({work})
                break
            if now - last_write >= keepalive_s:
                yield _comment("keep-alive")
                last_write = time.monotonic()
                continue
            wake_at = min(last_write + keepalive_s, deadline)
            if news:
                wake_at = min(wake_at, last_progress_at + PROGRESS_INTERVAL_S)
            if changed is None:
                changed = asyncio.ensure_future(progress.changed())
            await asyncio.wait({work, changed}, timeout=max(0.0, wake_at - now),
                               return_when=asyncio.FIRST_COMPLETED)
            if changed.done():
                changed = None
    finally:
        if changed is not None:
            changed.cancel()
    yield finished(work)


class EventStreamResponse(Response):
    """An ASGI response sending ``events`` as they come, until they end or the client goes away;
    ``on_close`` is called either way, once nothing of the stream runs any more.

    Not Starlette's ``StreamingResponse``: that one stops a stream whose client left by cancelling
    it inside a task group, and the cancellation's traceback, caught there in a reference cycle,
    keeps the stream's frames (and through them the restore and its pixels) alive until the
    garbage collector happens to run.
    """

    media_type = EVENT_STREAM

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        self.status_code = 200
        self.background = None
        # no-cache: nothing between here and the client may store or merge the events;
        # X-Accel-Buffering: nginx passes each event on at once instead of buffering the response.
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no body: no Content-Length
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client_gone = asyncio.ensure_future(until_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while (chunk := await _next_unless(self._events, client_gone)) is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not client_gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            client_gone.cancel()
            try:
                await self._events.aclose()
            finally:
                self._on_close()


async def until_disconnected(receive: Receive) -> None:
    """Return when the client goes away; for a request whose body has been read."""
    # The body has been read, so the next ASGI message can only be the client going away.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next_unless(events: AsyncIterator[bytes], client_gone: asyncio.Future) -> bytes | None:
    """The next event, or None once the events end or the client has gone."""
    if client_gone.done():
        return None
    upcoming = asyncio.ensure_future(anext(events))
    try:
        await asyncio.wait({upcoming, client_gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when this task is cancelled (the server's grace period over): the generator must
        # have stopped running before anyone can close it.
        if not upcoming.done():
            upcoming.cancel()
            await asyncio.wait({upcoming})
    if upcoming.cancelled():
        return None
    try:
        return upcoming.result()
    except StopAsyncIteration:
        return None
