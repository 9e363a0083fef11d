"""A watchdog on forward passes: which inference worker has been inside one for too long.

A pass that hangs (a wedged driver, a deadlocked kernel) cannot be stopped from Python; what
can be done is to say so. The batcher tells the watchdog when each pass begins and ends; the
service reads :meth:`StallWatch.stalled` to turn readiness off, and the log says when a worker
stalled and when it came back.
"""

from __future__ import annotations

import asyncio
import logging
import time

__all__ = ["StallWatch"]

log = logging.getLogger(__name__)


class StallWatch:
    """Args:
        limit_s: a pass running longer than this is stalled; None: never.
    """

    def __init__(self, limit_s: float | None):
        if limit_s is not None and not 0 < limit_s < float("inf"):
            raise ValueError(f"stall_after_s must be a finite number > 0 or None, got {limit_s!r}")
        self.limit_s = limit_s
        self._began: dict[str, float] = {}  # worker -> time.monotonic() its pass began
        self._alarms: dict[str, asyncio.TimerHandle] = {}

    def began(self, worker: str, what: str) -> None:
        self._began[worker] = time.monotonic()
        if self.limit_s is not None:
            self._alarms[worker] = asyncio.get_running_loop().call_later(self.limit_s, self._report, worker, what)

    def ended(self, worker: str) -> None:
        began = self._began.pop(worker, None)
        alarm = self._alarms.pop(worker, None)
        if alarm is not None:
            alarm.cancel()
        elif began is not None and self.limit_s is not None:
            log.warning("inference worker %s: the stalled forward pass returned after %.1f s; readiness is back",
                        worker, time.monotonic() - began)

    def stalled(self) -> dict[str, float]:
        """Workers whose pass now running began more than ``limit_s`` ago, and the seconds it has
        run; read at call time, so a pass that returns is no longer listed."""
        if self.limit_s is None:
            return {}
        now = time.monotonic()
        return {worker: now - began for worker, began in self._began.items() if now - began > self.limit_s}

    def _report(self, worker: str, what: str) -> None:
        self._alarms.pop(worker, None)
        log.error("inference worker %s: a forward pass of %s has run for more than %g s; readiness is off until it "
                  "returns", worker, what, self.limit_s)
