"""When :mod:`service.client` tries a request again, and how long it waits first.

A full queue or a service still loading (503), and a connection refused or dropped (the answer,
or an event stream, cut short), are retried with exponential backoff and jitter, waiting at
least as long as ``Retry-After`` asks; anything else is final, since sending the same image
again cannot change it.
"""

from __future__ import annotations

import random

import httpx

from .client_errors import ConnectionFailed, Overloaded, ServiceError, Timeout

_RETRIED_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                             httpx.RemoteProtocolError)


class RetryPolicy:
    """How long to wait before the next attempt, or None to stop; shared by both clients."""

    def __init__(self, base_url: str, retries: int, backoff: float, max_wait: float):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff < 0 or max_wait < 0:
            raise ValueError("backoff and max_wait must be >= 0")
        self.base_url = base_url
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """``attempt`` counts from 1 for the request that just failed."""
        if attempt > self.retries:
            return None
        step = min(self.max_wait, self.backoff * 2 ** (attempt - 1))
        if retry_after is None:
            # "Equal jitter": never retry at once, yet clients that failed together spread out.
            return random.uniform(step / 2, step)
        if retry_after > self.max_wait:
            return None  # the service asks for a longer pause than this caller agreed to wait
        # At least what the service asked for; the jitter keeps clients told the same number of
        # seconds from all coming back in the same instant, within the longest pause agreed.
        return min(self.max_wait, retry_after + random.uniform(0, step))

    def wait_after(self, failure: httpx.TransportError | Overloaded, attempt: int, retry: bool) -> float:
        """The pause before retrying the attempt that failed with ``failure``; when there is
        none, raises what the caller gets instead."""
        if isinstance(failure, Overloaded):
            wait = self.delay(attempt, failure.retry_after) if retry else None
            if wait is None:
                raise failure
            return wait
        wait = self.delay(attempt, None) if retry and isinstance(failure, _RETRIED_TRANSPORT_ERRORS) else None
        if wait is None:
            raise self.transport_error(failure, attempt) from failure
        return wait

    def transport_error(self, exc: httpx.TransportError, attempts: int) -> ServiceError:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return Timeout(f"no answer from {self.base_url} within the client's timeout ({type(exc).__name__})",
                           code="client_timeout", status=None)
        reason = str(exc) or type(exc).__name__
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return ConnectionFailed(f"cannot reach {self.base_url}{tries}: {reason}", code="connection_failed",
                                status=None)
