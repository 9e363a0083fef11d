"""How far one restore has got: tiles finished of the total, and the time left at its own pace.

The restore (:meth:`service.state.ServiceState.restore`) reports into a :class:`RestoreProgress`;
whoever shows progress (the event stream of :mod:`service.routes`) waits on :meth:`changed`
and reads :meth:`snapshot`. Reporting never blocks and never fails, because it runs inside the
batching queue's delivery of finished tiles.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

__all__ = ["RestoreProgress", "ProgressSnapshot"]


@dataclass(frozen=True)
class ProgressSnapshot:
    done: int
    total: int
    eta_s: float | None  # None until the pace can be measured


class RestoreProgress:
    """Tiles finished of one restore, as the queue delivers them."""

    def __init__(self) -> None:
        self.total: int | None = None  # known once the image is decoded and cut
        self.done = 0
        self._queued_at = 0.0
        self._expected_s: float | None = None  # the service's guess before this restore's own pace
        # The pace is measured from the first finished batch on, so that the time the request
        # waited for its first turn does not count as time per tile.
        self._first_done = 0
        self._first_done_at = 0.0
        self._last_done_at = 0.0
        self._changed = asyncio.Event()

    def started(self, total: int, expected_s: float | None = None) -> None:
        """The image is cut into ``total`` tiles, none finished yet; ``expected_s``: how long the
        queue expects them to take (its recent pace, the tiles ahead of them), if it knows."""
        self.total, self.done = total, 0
        self._queued_at = time.monotonic()
        self._expected_s = expected_s
        self._changed.set()

    def tiles_finished(self, done: int) -> None:
        now = time.monotonic()
        if self.done == 0:
            self._first_done, self._first_done_at = done, now
        self.done, self._last_done_at = done, now
        self._changed.set()

    @property
    def complete(self) -> bool:
        return self.total is not None and self.done >= self.total

    async def changed(self) -> None:
        """Return once something was reported since the last call."""
        await self._changed.wait()
        self._changed.clear()

    def snapshot(self) -> ProgressSnapshot | None:
        """None before the image is cut."""
        if self.total is None:
            return None
        return ProgressSnapshot(self.done, self.total, self._eta_s())

    def _eta_s(self) -> float | None:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if self.done == 0:
            if self._expected_s is None:
                return None
            return max(0.0, self._expected_s - (time.monotonic() - self._queued_at))
        if self.done > self._first_done:
            seconds_per_tile = (self._last_done_at - self._first_done_at) / (self.done - self._first_done)
        else:  # one batch so far: its tiles took at most the time since they were queued
            seconds_per_tile = (self._first_done_at - self._queued_at) / self.done
        # Counted from the last report, not now: between reports the estimate would otherwise
        # seem to stand still while time passes.
        return max(0.0, left * seconds_per_tile - (time.monotonic() - self._last_done_at))
