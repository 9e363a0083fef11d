"""Cross-request dynamic batching: tiles from any number of requests share forward passes.

The rest of the service sees one call, ``await batcher.submit(task, tiles, deadline)``, which
returns the restored tiles. Inside:

* Each request's tiles are one job in a :class:`~service.tile_queue.TileQueue`, which groups
  them by (task, tile shape), since only equal shapes stack into a batch, and decides which job
  goes next: fairly, so a small request is not kept waiting behind every tile of a large one.
* Workers, one per device, share the queue; each takes the group of the job due next, up to
  ``max_batch_size`` tiles from any of that group's jobs, waiting at most ``max_wait_s`` after
  the group's oldest job arrived for the batch to fill; while it waits, the other workers serve
  other groups, and tiles it leaves behind go to them. One large job is thus spread over every
  device.
* Each worker's forward passes run in a thread of its own; the event loop only moves arrays around.
* The queue is bounded in tiles. A submit that would pass the bound fails at once with
  :class:`QueueFull` (the caller answers 503), so memory cannot grow with the backlog.
* A job whose caller was cancelled (client gone) or whose deadline passed leaves the queue at
  once; if some of its tiles are already in a running batch, their results are discarded.
* An exception from a forward pass fails the jobs in that batch only; the worker goes on. A
  worker whose loop dies fails the batch it held and is restarted; the others are untouched.
* A forward pass that runs past ``stall_after_s`` (a hung device or driver) cannot be stopped from
  here, but it is reported: :meth:`Batcher.stalled_workers` names the worker (the service turns
  readiness off on it) and the log says when it stalled and when it came back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .tile_queue import Batch, Job, QueueKey, TileQueue
from .watchdog import StallWatch

__all__ = ["Batcher", "BatchResult", "BatchObserver", "QueueFull", "QueueClosed", "TooManyTiles",
           "DeadlineExceeded"]

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], np.ndarray]


class QueueFull(RuntimeError):
    """The queue cannot take these tiles now; ``retry_after_s`` estimates when it could."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueClosed(RuntimeError):
    """The batcher is shutting down and takes no new work."""


class TooManyTiles(ValueError):
    """More tiles than the whole queue holds: no amount of waiting would let them in."""


class DeadlineExceeded(TimeoutError):
    """The deadline passed before every tile was computed; the rest were dropped."""


class BatchObserver(Protocol):
    def batch_finished(self, task: str, size: int, seconds: float, worker: str) -> None: ...


@dataclass(frozen=True)
class BatchResult:
    """A job's restored tiles and where its time went (``queue + inference`` is its time inside)."""

    outputs: np.ndarray
    queue_seconds: float
    inference_seconds: float


@dataclass(eq=False)
class _Worker:
    name: str
    forward_by_task: dict[str, Forward]
    executor: ThreadPoolExecutor | None = None
    loop_task: asyncio.Task | None = None
    batch: Batch | None = None  # in its forward pass now; failed if the loop dies

    @property
    def alive(self) -> bool:
        return self.loop_task is not None and not self.loop_task.done()


class Batcher:
    """The batching queue and its inference workers.

    Args:
        workers: worker name (e.g. its device) -> per task, a blocking function from an
            (N, C, H, W) float32 batch to the restored batch of the same shape (``Engine.forward``).
            Every worker serves every task.
        max_batch_size: most tiles per forward pass.
        max_wait_s: longest a batch waits to fill after its oldest tile arrived.
        max_queued_tiles: bound on tiles waiting (not yet in a running batch), over all tasks.
        observer: told of every finished batch and the worker that ran it (the service's metrics).
        stall_after_s: a forward pass running longer than this makes its worker stalled (see
            :meth:`stalled_workers`); None: never.
    """

    def __init__(self, *, workers: Mapping[str, Mapping[str, Forward]], max_batch_size: int, max_wait_s: float,
                 max_queued_tiles: int, observer: BatchObserver | None = None, stall_after_s: float | None = None):
        if not workers:
            raise ValueError("workers must name at least one worker")
        tasks = None
        for name, by_task in workers.items():
            if not by_task:
                raise ValueError(f"forward_by_task of worker {name!r} must name at least one task")
            for task, forward in by_task.items():
                if not callable(forward):
                    raise TypeError(f"forward for task {task!r} must be callable, got {type(forward).__name__}")
            # Any worker may take any queue's batch, so each needs a model for every task.
            if tasks is not None and set(by_task) != set(tasks):
                raise ValueError(f"worker {name!r} serves {sorted(by_task)}, another serves {sorted(tasks)}; "
                                 f"every worker must serve the same tasks")
            tasks = tuple(by_task)
        for name, value in (("max_batch_size", max_batch_size), ("max_queued_tiles", max_queued_tiles)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(max_wait_s, (int, float)) or not 0 <= max_wait_s < math.inf:
            raise ValueError(f"max_wait_s must be a finite number >= 0, got {max_wait_s!r}")
        self._workers = [_Worker(str(name), dict(by_task)) for name, by_task in workers.items()]
        self._max_batch_size = max_batch_size
        self._max_wait_s = float(max_wait_s)
        self._max_queued_tiles = max_queued_tiles
        self._observer = observer
        self._stall_watch = StallWatch(stall_after_s)
        self._queue = TileQueue(tasks, on_expired=lambda job: self._fail(
            job, DeadlineExceeded("the deadline passed while the tiles were queued")))
        self._filling: set[QueueKey] = set()  # groups a worker waits on to fill
        self._work_arrived = asyncio.Event()
        self._pending: set[Job] = set()
        self._seconds_per_tile = 0.0  # moving average over all workers, for Retry-After and time left
        self._closed = self._started = False

    # -- public surface -----------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._queue.tasks

    @property
    def queued_tiles(self) -> int:
        return self._queue.queued_tiles

    @property
    def full(self) -> bool:
        """No room for even one more tile: any request now would be refused."""
        return self.queued_tiles >= self._max_queued_tiles

    def depth_by_task(self) -> dict[str, int]:
        return self._queue.depth_by_task()

    @property
    def running(self) -> bool:
        """Whether every worker is alive; false before :meth:`start` and after :meth:`close`."""
        return self._started and all(worker.alive for worker in self._workers)

    def stalled_workers(self) -> dict[str, float]:
        """Workers in a forward pass for longer than ``stall_after_s``, and its seconds so far."""
        return self._stall_watch.stalled()

    def start(self) -> None:
        """Start the workers; call from the event loop that will submit."""
        if self._started:
            raise RuntimeError("the batcher was already started")
        self._started = True
        for index, worker in enumerate(self._workers):
            # One thread per worker: its device runs one batch at a time, and a single caller
            # thread keeps PyTorch's per-thread state (CUDA streams, autocast) in one place.
            worker.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mprnet-inference-{index}")
            self._spawn_worker(worker)

    async def submit(self, task: str, tiles: np.ndarray, deadline: float | None = None,
                     on_progress: Callable[[int], None] | None = None) -> BatchResult:
        """Queue ``tiles`` (N, C, H, W) float32 for ``task``; return the restored tiles in order.

        The results are written over ``tiles`` (the result's ``outputs`` is the same array): a
        large image's tiles are hundreds of megabytes, and a second array for the outputs would
        double them.

        ``deadline`` is a ``time.monotonic()`` value. Raises :class:`QueueFull`,
        :class:`TooManyTiles`, :class:`QueueClosed`, :class:`DeadlineExceeded`, or whatever the
        forward pass raised for the batch holding these tiles. Cancelling the caller drops the
        tiles that have not yet gone into a batch.

        ``on_progress`` is called in the event loop with the number of tiles finished so far,
        after every batch that held some of them.
        """
        if task not in self.tasks:
            raise KeyError(f"no model for task {task!r}; this batcher serves {', '.join(self.tasks)}")
        if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or len(tiles) == 0:
            raise ValueError(f"tiles must be a non-empty (N, C, H, W) array, got {getattr(tiles, 'shape', tiles)!r}")
        tiles = np.asarray(tiles, dtype=np.float32)
        # Not `self.running`: a worker that just died is restarted on the next loop turn, and
        # the queue is still there for the new one.
        if self._closed or not self._started:
            raise QueueClosed("the inference queue is not accepting work (starting or shutting down)")
        count = len(tiles)
        if count > self._max_queued_tiles:
            raise TooManyTiles(f"the image needs {count} tiles, more than the queue holds "
                               f"({self._max_queued_tiles})")
        if self.queued_tiles + count > self._max_queued_tiles:
            raise QueueFull(f"the inference queue is full ({self.queued_tiles} of {self._max_queued_tiles} tiles "
                            f"waiting)", self.retry_after_s())
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("the request's deadline passed before its tiles were queued")
        job = Job(task=task, tiles=tiles, outputs=tiles,
                  future=asyncio.get_running_loop().create_future(), deadline=deadline, enqueued_at=now,
                  on_progress=on_progress)
        self._queue.add(job)
        self._pending.add(job)
        self._work_arrived.set()
        time_limit = asyncio.timeout(None if deadline is None else deadline - time.monotonic())
        missed = None
        try:
            async with time_limit:
                return await job.future
        except TimeoutError:
            if not time_limit.expired():
                raise  # the forward pass's own error, or the worker's DeadlineExceeded
            missed = f"the deadline passed with {job.count - job.finished} of {job.count} tiles not computed"
        finally:
            self._forget(job)
            # Any error raised here holds this frame in its traceback, and is itself held by the
            # job's future and by the calling task (which the timeout refers to): without these
            # deletions they would keep each other, and the job's pixels, alive until the garbage
            # collector ran.
            del job, time_limit
        # Raised outside the except block, so that it carries no context pointing back at the timeout.
        raise DeadlineExceeded(missed)

    async def close(self, grace_s: float = 0.0) -> None:
        """Take no new work, give queued work ``grace_s`` to finish, then stop the workers."""
        self._closed = True
        waiting = [job.future for job in self._pending if not job.future.done()]
        if waiting and grace_s > 0:
            await asyncio.wait(waiting, timeout=grace_s)
        for job in list(self._pending):
            self._fail(job, QueueClosed("the service shut down before these tiles were computed"))
        for worker in self._workers:
            if worker.loop_task is not None:
                worker.loop_task.cancel()
                try:
                    await worker.loop_task
                except asyncio.CancelledError:
                    pass
            if worker.executor is not None:
                worker.executor.shutdown(wait=False, cancel_futures=True)

    # -- the workers --------------------------------------------------------------------------

    def _spawn_worker(self, worker: _Worker) -> None:
        worker.loop_task = asyncio.get_running_loop().create_task(self._serve_forever(worker),
                                                                  name=f"mprnet-batcher-{worker.name}")
        worker.loop_task.add_done_callback(lambda loop_task: self._worker_stopped(worker, loop_task))

    def _worker_stopped(self, worker: _Worker, loop_task: asyncio.Task) -> None:
        if loop_task.cancelled() or self._closed:
            return
        # A bug in the loop itself, not in a forward pass (those are caught per batch). Fail the
        # batch it was holding, whose callers would otherwise wait forever, and carry on.
        error = loop_task.exception()
        log.error("batching worker %s died; restarting it", worker.name, exc_info=error)
        if worker.batch is not None:
            for job, _, _ in worker.batch.parts:
                self._fail(job, error)
            worker.batch = None
        self._stall_watch.ended(worker.name)
        self._spawn_worker(worker)

    async def _serve_forever(self, worker: _Worker) -> None:
        while True:
            key = self._queue.next_key(time.monotonic(), skip=self._filling)
            if key is None:
                self._work_arrived.clear()
                await self._work_arrived.wait()
                continue
            batch = await self._fill_and_take(key)
            if batch is not None:  # None: everything in that group was dropped while it filled
                await self._run_batch(worker, batch)
            # Nothing of the batch stays referenced while this worker idles, so its pixels are
            # freed as soon as its requests are done with them.
            del batch

    async def _run_batch(self, worker: _Worker, batch: Batch) -> None:
        worker.batch = batch
        started = time.monotonic()
        self._stall_watch.began(worker.name, f"{len(batch.tiles)} {batch.task} tile(s)")
        for job, _, _ in batch.parts:
            job.batch_started(started)
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                worker.executor, worker.forward_by_task[batch.task], batch.tiles)
            if getattr(outputs, "shape", None) != batch.tiles.shape:
                raise ValueError(f"forward returned shape {getattr(outputs, 'shape', None)} for a batch of "
                                 f"shape {batch.tiles.shape}")
        except Exception as error:  # delivered to the batch's callers instead
            log.warning("forward pass failed for a %s batch of %d tiles: %r", batch.task, len(batch.tiles), error,
                        exc_info=error)
            # Delivered without its traceback, whose frames hold the batch's tensors: each caller
            # may keep the error a while, and the pixels should not stay with it.
            error = error.with_traceback(None)
            for job, _, _ in batch.parts:
                self._fail(job, error)
            return
        finally:
            worker.batch = None
            self._stall_watch.ended(worker.name)
        finished = time.monotonic()
        self._deliver(batch, outputs, finished)
        self._record_speed(len(batch.tiles), finished - started)
        if self._observer is not None:
            self._observer.batch_finished(batch.task, len(batch.tiles), finished - started, worker.name)

    async def _fill_and_take(self, key: QueueKey) -> Batch | None:
        self._filling.add(key)
        try:
            await self._let_batch_fill(key)
            batch = self._queue.take(key, self._max_batch_size, time.monotonic())
        finally:
            self._filling.discard(key)
        if self._queue.untaken_in(key):
            self._work_arrived.set()  # the rest is for an idle worker, which skipped this group
        return batch

    async def _let_batch_fill(self, key: QueueKey) -> None:
        oldest = self._queue.oldest_arrival(key, time.monotonic())
        if oldest is None:
            return
        fill_by = oldest + self._max_wait_s
        while self._queue.untaken_in(key) < self._max_batch_size:
            remaining = fill_by - time.monotonic()
            if remaining <= 0:
                return
            self._work_arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._work_arrived.wait()
            except TimeoutError:
                return

    def _deliver(self, batch: Batch, outputs: np.ndarray, finished: float) -> None:
        offset = 0
        for job, first, count in batch.parts:
            job.batch_ended(finished)
            if not job.future.done():
                job.outputs[first:first + count] = outputs[offset:offset + count]
                job.finished += count
                if job.on_progress is not None:
                    job.on_progress(job.finished)
                if job.finished == job.count:
                    total = time.monotonic() - job.enqueued_at
                    job.future.set_result(BatchResult(outputs=job.outputs, inference_seconds=job.inference_seconds,
                                                      queue_seconds=max(0.0, total - job.inference_seconds)))
            offset += count

    # -- bookkeeping --------------------------------------------------------------------------

    def _fail(self, job: Job, error: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(error)
        self._forget(job)

    def _forget(self, job: Job) -> None:
        """Release a job that needs nothing more: its queued tiles stop counting and its arrays go."""
        if job not in self._pending:
            return
        self._pending.discard(job)
        if not job.future.done():
            job.future.cancel()
        self._queue.release(job)
        job.on_progress = None  # it may refer to the request's stream
        job.tiles = None  # the queue keeps the job object until it reaches the head; not its pixels

    def _record_speed(self, tiles: int, seconds: float) -> None:
        per_tile, previous = seconds / tiles, self._seconds_per_tile
        self._seconds_per_tile = per_tile if not previous else 0.8 * previous + 0.2 * per_tile

    def expected_seconds(self, tiles: int) -> float | None:
        """How long ``tiles`` submitted now would take, sharing the workers with the jobs queued,
        at the recent speed; None before any batch has run."""
        if not self._seconds_per_tile:
            return None
        return self._queue.tiles_until_done(tiles) * self._seconds_per_tile / len(self._workers)

    def retry_after_s(self) -> int:
        """Seconds until the queued tiles should be done, at the recent speed (at least 1)."""
        return max(1, math.ceil(self.queued_tiles * self._seconds_per_tile / len(self._workers)))
