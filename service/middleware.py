"""ASGI middleware, one job each: accounting for every request, admission of restores, and HEAD
answered wherever GET is.

Pure ASGI rather than route dependencies because some answers never reach a route: the 413 for
a declared oversize body (sent before a byte of it is read), 404s for unknown paths, and 422s
from FastAPI's own validation.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ServiceError, error_response
from .memory import ArrivingBody, MemoryBudget, OverBudget
from .metrics import UNKNOWN_TASK, ServiceMetrics
from .security import route_path

__all__ = ["RequestAccounting", "AdmissionControl", "HeadAsGet", "REQUEST_ID_HEADER", "RESTORE_PREFIX"]

request_log = logging.getLogger("service.requests")

RESTORE_PREFIX = "/v1/restore/"
REQUEST_ID_HEADER = "X-Request-ID"
# Echoed into a response header and the logs, so only a safe alphabet and a bounded length.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _headers(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}


class RequestAccounting:
    """Request id, metrics and one log line for every request, whatever layer answered it.

    The request id (the client's ``X-Request-ID`` if it is safe to echo, else a new one) goes
    into ``scope["state"]`` with the log entry that inner layers add fields to.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, tasks: tuple[str, ...]):
        self.app = app
        self.metrics = metrics
        self.tasks = tasks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        client_id = _headers(scope).get(REQUEST_ID_HEADER.lower(), "")
        request_id = client_id if _CLIENT_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex
        entry: dict[str, Any] = {"request_id": request_id, "method": scope["method"], "path": scope["path"]}
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=started, log_entry=entry)

        path = route_path(scope)
        is_restore = path.startswith(RESTORE_PREFIX)
        task = path[len(RESTORE_PREFIX):]
        # Only a POST restores: other methods are counted apart, as are requests without a valid
        # key below, so that nobody without a key can dilute a task's error rate or latency.
        task_label = task if task in self.tasks and scope["method"] == "POST" else UNKNOWN_TASK
        status = 500  # what the client sees if the app raises before answering

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()),
                                      (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
            await send(message)

        if is_restore:
            self.metrics.in_flight.labels(task_label).inc()
        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            seconds = time.monotonic() - started
            entry.update(status=status, duration_ms=round(seconds * 1000, 2))
            if is_restore:
                self.metrics.in_flight.labels(task_label).dec()
                counted_as = UNKNOWN_TASK if status == 401 else task_label
                # An event stream starts as 200 and says how it ended in its last event.
                self.metrics.requests.labels(counted_as, str(entry.get("outcome", status))).inc()
                self.metrics.request_duration.labels(counted_as).observe(seconds)
            level = logging.DEBUG if path in _PROBE_PATHS and status < 400 else logging.INFO
            request_log.log(level, json.dumps(entry, separators=(",", ":")))


def _is_count(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit alone takes "²", which int() refuses


def _over_capacity(exc: OverBudget) -> ServiceError:
    return ServiceError(503, "over_capacity", f"{exc}; retry later", {"Retry-After": str(exc.retry_after_s)})


def _counting_into(body: ArrivingBody, receive: Receive) -> Receive:
    """``receive``, holding each chunk of the request body in the memory budget as it arrives."""

    async def counted() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            try:
                body.add(len(message.get("body", b"")))
            except OverBudget as exc:
                # An HTTPException, so the body parser passes it on and the route never runs;
                # the bytes already spooled are freed as the parser unwinds.
                raise _over_capacity(exc) from None
        return message

    return counted


class AdmissionControl:
    """Refuses a restore before its body is read: unknown task (404), declared body over the
    limit (413), queue full (503), no room in the memory budget for the body (503). Nothing of a
    refused upload is buffered. An admitted request holds its body's bytes in the budget as they
    arrive, until it is answered; a chunk that would pass the budget ends the upload with 503.

    Args:
        app: the application behind it.
        tasks: the tasks this service restores.
        max_upload_bytes: the largest body accepted; what a body of undeclared length may hold.
        budget: bytes and pixels all requests in flight may hold.
        queue_refusal: returns the 503 to answer now, or None while the queue has room.
    """

    def __init__(self, app: ASGIApp, tasks: tuple[str, ...], max_upload_bytes: int, budget: MemoryBudget,
                 queue_refusal: Callable[[], ServiceError | None]):
        self.app = app
        self.tasks = tasks
        self.max_upload_bytes = max_upload_bytes
        self.budget = budget
        self.queue_refusal = queue_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if not path.startswith(RESTORE_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        declared = headers.get("content-length", "")
        body_bytes = int(declared) if _is_count(declared) else self.max_upload_bytes
        refusal = self._refusal(path[len(RESTORE_PREFIX):], headers)
        if refusal is None:
            try:
                with self.budget.receiving(body_bytes) as body:
                    await self.app(scope, _counting_into(body, receive), send)
                return
            except OverBudget as exc:
                refusal = _over_capacity(exc)
        entry = scope.get("state", {}).get("log_entry")
        if entry is not None:
            entry["error"] = refusal.code
        await error_response(refusal.status_code, refusal.code, refusal.detail, refusal.headers)(scope, receive, send)

    def _refusal(self, task: str, headers: dict[str, str]) -> ServiceError | None:
        if task not in self.tasks:
            return ServiceError(404, "unknown_task",
                                f"no task {task!r} here; this service restores: {', '.join(self.tasks)}")
        declared = headers.get("content-length", "")
        if _is_count(declared) and int(declared) > self.max_upload_bytes:
            return ServiceError(413, "payload_too_large",
                                f"the upload is {int(declared)} bytes; the limit is {self.max_upload_bytes} bytes")
        # Refusing now, before the upload is read and decoded, is what keeps the cost of a
        # refusal small while clients far outnumber what the device can take.
        return self.queue_refusal()


class HeadAsGet:
    """HEAD runs as GET, and the answer goes out without its body (its headers, Content-Length
    included, unchanged): HTTP requires HEAD wherever GET is served, uptime checkers and load
    balancers use it, and FastAPI's GET routes would refuse it with 405."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)
