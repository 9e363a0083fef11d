"""Cutting clients that send too slowly, which uvicorn does not do by itself.

Two limits, both on what the client owes the server:

* **Head deadline.** From the moment the server waits for a request (the connection opened, or
  the previous response ended), the request line and headers must be complete within
  ``head_timeout_s``. A connection that sends half a head and stops would otherwise hold its
  socket and its place under ``limit_concurrency`` forever.
* **Body rate.** While a body is arriving, every ``body_rate_window_s`` must bring at least
  ``body_min_rate`` bytes per second on average. A per-chunk idle timeout alone would let a
  client trickle one byte just under it, for hours; a rate over a window does not.

And one at shutdown: an upload still arriving when the graceful period is about to end is cut
with the API's 503 ``not_ready`` (``Retry-After``), so that its client can retry elsewhere.
uvicorn would otherwise cancel it at the end of the period and answer a bare text/plain 500.

All three live in the HTTP/1.1 protocol rather than in an ASGI layer: a half-sent head never reaches
the application, and only the protocol can close the socket. A cut writes a 408 when no response
to the request being received has begun, then closes the transport. To the application that is
the client hanging up: ``receive()`` answers ``http.disconnect``, Starlette's multipart parser
closes the upload's spooled temporary files, and the route stops waiting.

The protocol is uvicorn's h11 one, chosen explicitly rather than ``auto`` (httptools when
installed): the phases below are read from h11's connection state, and the HTTP parser's speed is
nothing next to a forward pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .security import security_headers

__all__ = ["SHUTDOWN_CUT_MARGIN_S", "SlowClientLimits", "SlowClientProtocol"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlowClientLimits:
    head_timeout_s: float
    body_min_rate: float  # bytes per second; 0 turns the floor off
    body_rate_window_s: float


# How long before the end of the graceful period an upload still arriving is cut.
SHUTDOWN_CUT_MARGIN_S = 1.0


def _error_response(status: str, code: str, message: str, headers: str = "") -> bytes:
    # Written straight to the socket just before it closes, so h11's bookkeeping for this
    # connection does not matter any more. Same body shape as the service's other errors.
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    marks = "".join(f"{name.decode()}: {value.decode()}\r\n" for name, value in security_headers())
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n{headers}{marks}"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class SlowClientProtocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline and a body rate floor.

    Use as ``uvicorn.Config(app, http=functools.partial(SlowClientProtocol, limits=...))``.

    One timer per connection at most: the head deadline while the client's h11 state is IDLE
    (the server waits for a request), the rate window while it is SEND_BODY. Every call that can
    move h11's state (bytes in, a response finished) re-reads the state and re-arms on a change.
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: SlowClientLimits):
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._phase: object = None  # the client's h11 state (a sentinel class) the timer was armed for
        self._timer: asyncio.TimerHandle | None = None
        self._window_bytes = 0  # received in the current rate window
        self._shutdown_cut: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow_client()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_client()
        if self._phase is h11.SEND_BODY:
            # The packet that completes a head may carry it too; counting the head as body only
            # errs towards leniency, by at most one head.
            self._window_bytes += len(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            # The next request's head has begun, pipelined behind this one: the head deadline
            # governs it (a 408 if it never ends), not the keep-alive timer uvicorn just set,
            # which would close the connection without a word after 5 s.
            self._unset_keepalive_if_required()
        self._follow_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._shutdown_cut is not None:
            self._shutdown_cut.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        super().shutdown()
        grace = self.config.timeout_graceful_shutdown
        if grace is not None and not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            self._shutdown_cut = self.loop.call_later(max(grace - SHUTDOWN_CUT_MARGIN_S, 0.0),
                                                      self._upload_outlived_shutdown)

    def _upload_outlived_shutdown(self) -> None:
        self._shutdown_cut = None
        if self.conn.their_state is h11.SEND_BODY:
            self._cut("the upload was still arriving as the server shut down", answer=self._may_answer(),
                      response=_error_response("503 Service Unavailable", "not_ready",
                                               "the service is shutting down; send the image again",
                                               "retry-after: 1\r\n"))

    # -- the limits ---------------------------------------------------------------------------

    def _follow_client(self) -> None:
        if self.transport.is_closing():
            self._stop_timer()
            return
        phase = self.conn.their_state
        if phase is self._phase:
            return  # still waiting for the same head, or reading the same body: the clock runs on
        self._phase = phase
        self._stop_timer()
        if phase is h11.IDLE:
            self._timer = self.loop.call_later(self.limits.head_timeout_s, self._head_overdue)
        elif phase is h11.SEND_BODY and self.limits.body_min_rate > 0:
            self._start_rate_window()

    def _start_rate_window(self) -> None:
        self._window_bytes = 0
        self._timer = self.loop.call_later(self.limits.body_rate_window_s, self._check_body_rate)

    def _head_overdue(self) -> None:
        self._timer = None
        # Bytes h11 holds unparsed are a head begun; a connection that sent nothing (an idle
        # keep-alive one) is closed without an answer to a request it never made.
        begun = bool(self.conn.trailing_data[0])
        self._cut(f"the request head was not complete within {self.limits.head_timeout_s:g} s", answer=begun)

    def _check_body_rate(self) -> None:
        self._timer = None
        window = self.limits.body_rate_window_s
        # Reading paused because the application is not taking the body yet, or the client
        # politely waiting for our 100 Continue: then the slowness is ours, not the client's.
        held_back_by_us = self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue)
        if not held_back_by_us and self._window_bytes < self.limits.body_min_rate * window:
            rate = self._window_bytes / window
            self._cut(f"the request body arrived at {rate:.0f} bytes/s over the last {window:g} s; the minimum "
                      f"is {self.limits.body_min_rate:g} bytes/s", answer=self._may_answer())
            return
        self._start_rate_window()

    def _may_answer(self) -> bool:
        return self.cycle is not None and not self.cycle.response_started

    def _cut(self, reason: str, answer: bool, response: bytes | None = None) -> None:
        """Close the connection, first writing ``response`` (by default a 408 giving ``reason``) if ``answer``."""
        if self.transport.is_closing():
            return  # closed for another reason (keep-alive expiry, a 400) between the timer and now
        client = "%s:%d" % self.client if self.client else "a client"
        log.info("closing the connection from %s: %s", client, reason)
        if answer:
            self.transport.write(response or _error_response("408 Request Timeout", "request_timeout", reason))
        # connection_lost follows and tells the application the client is gone.
        self.transport.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
