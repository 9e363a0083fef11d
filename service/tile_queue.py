"""The tiles waiting for a forward pass, and which of them go next: the batching queue's policy.

Each request's tiles are one :class:`Job`. Only tiles of one task and shape stack into a batch,
so jobs are grouped by that key; but which job is served next is decided across all of them,
by start-time fair queuing: a job's tag is the virtual time when it arrived plus the tiles it
has had taken, and the job with the lowest tag goes next (ties: the one served least, then the
oldest). The virtual time is the tag of the job last served. So a job that arrives while a
large one runs is served right after the batch in progress, not after all of the large one's
tiles, and jobs that wait together share the device tile by tile, each in arrival order.

Synchronous and free of I/O: the :class:`~service.batching.Batcher` owns the workers, futures
and clocks, and calls in here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Job", "Batch", "TileQueue", "QueueKey"]

QueueKey = tuple[str, tuple[int, ...]]  # (task, tile shape)


@dataclass(eq=False)
class Job:
    """One request's tiles, from queued to delivered."""

    task: str
    tiles: np.ndarray | None
    outputs: np.ndarray | None
    future: asyncio.Future
    deadline: float | None  # time.monotonic()
    enqueued_at: float
    start_tag: float = 0.0  # the virtual time it arrived at
    taken: int = 0  # tiles [0, taken) have gone into batches
    finished: int = 0
    inference_seconds: float = 0.0
    running_batches: int = 0
    busy_since: float = 0.0
    on_progress: Callable[[int], None] | None = None  # told the tiles finished so far

    @property
    def count(self) -> int:
        return len(self.outputs) if self.outputs is not None else 0

    @property
    def untaken(self) -> int:
        return self.count - self.taken if not self.future.done() else 0

    @property
    def key(self) -> QueueKey:
        return self.task, tuple(self.outputs.shape[1:])

    @property
    def tag(self) -> tuple[float, int, float]:
        return self.start_tag + self.taken, self.taken, self.enqueued_at

    # Inference time is the time any of the job's tiles were in a forward pass, not the sum over
    # its batches: on several devices they overlap, and the sum would exceed the job's own time.
    def batch_started(self, now: float) -> None:
        if self.running_batches == 0:
            self.busy_since = now
        self.running_batches += 1

    def batch_ended(self, now: float) -> None:
        self.running_batches -= 1
        if self.running_batches == 0:
            self.inference_seconds += now - self.busy_since


@dataclass
class Batch:
    task: str
    tiles: np.ndarray
    parts: list[tuple[Job, int, int]] = field(default_factory=list)  # (job, first tile, count)


class TileQueue:
    """Jobs waiting for tiles to be computed, counted per task, grouped per (task, shape).

    Args:
        tasks: the tasks it holds jobs for.
        on_expired: called with a job whose deadline passed while it waited; the queue drops it.
    """

    def __init__(self, tasks: tuple[str, ...], on_expired: Callable[[Job], None]):
        self._groups: dict[QueueKey, list[Job]] = {}
        self._queued_by_task = dict.fromkeys(tasks, 0)
        self._on_expired = on_expired
        self._virtual_time = 0.0

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._queued_by_task)

    @property
    def queued_tiles(self) -> int:
        """Tiles waiting, not yet in a batch, over all tasks."""
        return sum(self._queued_by_task.values())

    def depth_by_task(self) -> dict[str, int]:
        return dict(self._queued_by_task)

    def tiles_until_done(self, tiles: int) -> int:
        """About how many tiles the workers will take before a job of ``tiles`` added now has had
        its last one taken: its own, and from each waiting job as many as it still has, up to as
        many turns as the new job needs, since jobs share the device turn by turn."""
        return tiles + sum(min(job.untaken, tiles) for jobs in self._groups.values() for job in jobs)

    def add(self, job: Job) -> None:
        job.start_tag = self._virtual_time
        self._groups.setdefault(job.key, []).append(job)
        self._queued_by_task[job.task] += job.count

    def release(self, job: Job) -> None:
        """The job wants nothing more (done, failed, cancelled): its untaken tiles stop counting."""
        self._queued_by_task[job.task] -= job.count - job.taken
        job.taken = job.count

    def next_key(self, now: float, skip: set[QueueKey]) -> QueueKey | None:
        """The group of the job to serve next, leaving out ``skip`` (groups a worker is filling)."""
        best = None
        for key in list(self._groups):
            if key in skip:
                continue
            for job in self._live_jobs(key, now):
                if best is None or job.tag < best.tag:
                    best = job
        return None if best is None else best.key

    def untaken_in(self, key: QueueKey) -> int:
        return sum(job.untaken for job in self._groups.get(key, ()))

    def oldest_arrival(self, key: QueueKey, now: float) -> float | None:
        jobs = self._live_jobs(key, now)
        return min(job.enqueued_at for job in jobs) if jobs else None

    def take(self, key: QueueKey, max_tiles: int, now: float) -> Batch | None:
        """Up to ``max_tiles`` tiles of one group, one at a time to the job with the lowest tag."""
        jobs = self._live_jobs(key, now)
        parts: list[list] = []
        for _ in range(max_tiles):
            if not jobs:
                break
            job = min(jobs, key=lambda candidate: candidate.tag)
            self._virtual_time = job.tag[0]
            if parts and parts[-1][0] is job:
                parts[-1][2] += 1
            else:
                parts.append([job, job.taken, 1])
            job.taken += 1
            self._queued_by_task[job.task] -= 1
            if job.untaken == 0:
                jobs.remove(job)
        self._live_jobs(key, now)  # forget the jobs this batch finished taking
        if not parts:
            return None
        slices = [job.tiles[first:first + count] for job, first, count in parts]
        # A batch from a single job is a view of its tiles, not a copy.
        tiles = slices[0] if len(slices) == 1 else np.concatenate(slices)
        return Batch(task=key[0], tiles=tiles, parts=[tuple(part) for part in parts])

    def _live_jobs(self, key: QueueKey, now: float) -> list[Job]:
        """The group's jobs that still want tiles computed; drops the others, failing the expired."""
        jobs = self._groups.get(key)
        if not jobs:
            self._groups.pop(key, None)
            return []
        for job in jobs:
            if job.deadline is not None and job.deadline <= now and not job.future.done():
                self._on_expired(job)
        live = [job for job in jobs if job.untaken > 0]
        if live:
            self._groups[key] = live
        else:
            del self._groups[key]
        return list(live)
