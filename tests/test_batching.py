"""The batching queue on its own, with plain array functions in the forward pass's place."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher, DeadlineExceeded, QueueClosed, QueueFull, TooManyTiles

from service_helpers import finished, until

pytestmark = pytest.mark.timeout(120)  # hangs fail; a slow shared CI machine does not


def tiles_of(value: float, count: int = 1, side: int = 8) -> np.ndarray:
    """``count`` tiles whose every pixel is ``value`` (so a tile says which request it came from)."""
    return np.full((count, 3, side, side), value, dtype=np.float32)


class RecordingForward:
    """Doubles its input and remembers every batch; can be held to build up a backlog."""

    def __init__(self, fail_on_value: float | None = None):
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on_value = fail_on_value

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(10), "the test never released the forward pass"
        self.batches.append(batch.copy())
        if self.fail_on_value is not None and np.any(batch == self.fail_on_value):
            raise RuntimeError("poisoned tile")
        return batch * 2

    def values_seen(self) -> set[float]:
        return {float(v) for batch in self.batches for v in np.unique(batch)}


async def hold_worker(batcher: Batcher, forward: RecordingForward, task: str = "denoising") -> asyncio.Task:
    """Put one tile into a forward pass that blocks until ``forward.gate`` is set."""
    forward.gate.clear()
    forward.entered.clear()
    blocker = asyncio.create_task(batcher.submit(task, tiles_of(-1.0)))
    assert await asyncio.to_thread(forward.entered.wait, 30), "the held tile never reached the forward pass"
    return blocker


def make_batcher(forward_by_task, **overrides) -> Batcher:
    """One worker serving ``forward_by_task``."""
    options = dict(max_batch_size=4, max_wait_s=0.05, max_queued_tiles=16)
    options.update(overrides)
    return Batcher(workers={"0": forward_by_task}, **options)


def test_concurrent_requests_share_a_batch_and_get_their_own_tiles_back():
    forward = RecordingForward()

    async def scenario():
        batcher = make_batcher({"denoising": forward}, max_wait_s=0.5)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("denoising", tiles_of(v)) for v in (1.0, 2.0, 3.0)))
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert [float(r.outputs.max()) for r in results] == [2.0, 4.0, 6.0]
    assert [len(b) for b in forward.batches] == [3]
    assert all(r.inference_seconds > 0 and r.queue_seconds >= 0 for r in results)


def test_a_large_job_is_split_into_batches_in_order():
    forward = RecordingForward()

    async def scenario():
        batcher = make_batcher({"denoising": forward})
        batcher.start()
        tiles = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 8, 8), np.float32)
        result = await batcher.submit("denoising", tiles.copy())  # the results are written over the tiles
        await batcher.close()
        return tiles, result

    tiles, result = asyncio.run(scenario())
    assert [len(b) for b in forward.batches] == [4, 4, 2]
    np.testing.assert_array_equal(result.outputs, tiles * 2)


def test_a_full_batch_does_not_wait():
    forward = RecordingForward()

    async def scenario():
        # A wait far past the guard below: a full batch that waited for company would fail it.
        batcher = make_batcher({"denoising": forward}, max_wait_s=3600)
        batcher.start()
        result = await finished(batcher.submit("denoising", tiles_of(1.0, count=4)), "a full batch")
        await batcher.close()
        return result

    result = asyncio.run(scenario())
    assert float(result.outputs.max()) == 2.0 and [len(b) for b in forward.batches] == [4]


def test_a_partial_batch_waits_for_company_then_runs_without_it():
    forward = RecordingForward()

    async def scenario():
        batcher = make_batcher({"denoising": forward}, max_wait_s=0.3)
        batcher.start()
        result = await finished(batcher.submit("denoising", tiles_of(1.0, count=1)), "a partial batch")
        await batcher.close()
        return result

    result = asyncio.run(scenario())
    assert [len(b) for b in forward.batches] == [1]  # no company came, and it ran anyway
    assert result.queue_seconds >= 0.25  # after waiting (max_wait_s) for company


def test_tiles_of_different_shapes_never_share_a_batch():
    forward = RecordingForward()

    async def scenario():
        batcher = make_batcher({"denoising": forward}, max_wait_s=0.2)
        batcher.start()
        small, large = await asyncio.gather(batcher.submit("denoising", tiles_of(1.0, side=8)),
                                            batcher.submit("denoising", tiles_of(2.0, side=16)))
        await batcher.close()
        return small, large

    small, large = asyncio.run(scenario())
    assert small.outputs.shape == (1, 3, 8, 8) and large.outputs.shape == (1, 3, 16, 16)
    assert sorted(b.shape[-1] for b in forward.batches) == [8, 16]


def test_the_worker_serves_the_oldest_work_first_across_tasks():
    forward = RecordingForward()
    order: list[str] = []

    def labelled(task):
        def run(batch):
            order.append(task)
            return forward(batch)
        return run

    async def scenario():
        batcher = make_batcher({"deblurring": labelled("deblurring"), "denoising": labelled("denoising")},
                               max_batch_size=1, max_wait_s=0)
        batcher.start()
        blocker = await hold_worker(batcher, forward, task="deblurring")
        second = asyncio.create_task(batcher.submit("denoising", tiles_of(1.0)))
        await until(lambda: batcher.queued_tiles == 1)
        third = asyncio.create_task(batcher.submit("deblurring", tiles_of(2.0)))
        await until(lambda: batcher.queued_tiles == 2)
        forward.gate.set()
        await asyncio.gather(blocker, second, third)
        await batcher.close()

    asyncio.run(scenario())
    assert order == ["deblurring", "denoising", "deblurring"]


def test_a_full_queue_refuses_at_once_with_a_retry_estimate():
    forward = RecordingForward()

    async def scenario():
        batcher = make_batcher({"denoising": forward}, max_queued_tiles=6)
        batcher.start()
        blocker = await hold_worker(batcher, forward)
        queued = asyncio.create_task(batcher.submit("denoising", tiles_of(1.0, count=5)))
        await until(lambda: batcher.queued_tiles == 5)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit("denoising", tiles_of(2.0, count=2))
        with pytest.raises(TooManyTiles):
            await batcher.submit("denoising", tiles_of(3.0, count=7))
        depth_while_full = batcher.depth_by_task()
        forward.gate.set()
        await asyncio.gather(blocker, queued)
        accepted_after = await batcher.submit("denoising", tiles_of(4.0, count=6))
        await batcher.close()
        return refused.value, depth_while_full, accepted_after

    refused, depth_while_full, accepted_after = asyncio.run(scenario())
    assert refused.retry_after_s >= 1
    assert depth_while_full == {"denoising": 5}
    assert float(accepted_after.outputs.max()) == 8.0
    assert 2.0 not in forward.values_seen() and 3.0 not in forward.values_seen()


def test_a_cancelled_caller_frees_its_queued_tiles_and_they_are_never_computed():
    forward = RecordingForward()

    async def scenario():
        batcher = make_batcher({"denoising": forward})
        batcher.start()
        blocker = await hold_worker(batcher, forward)
        abandoned = asyncio.create_task(batcher.submit("denoising", tiles_of(7.0, count=3)))
        kept = asyncio.create_task(batcher.submit("denoising", tiles_of(1.0)))
        await until(lambda: batcher.queued_tiles == 4)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        depth_after_cancel = batcher.queued_tiles
        forward.gate.set()
        await asyncio.gather(blocker, kept)
        await batcher.close()
        return depth_after_cancel, abandoned

    depth_after_cancel, abandoned = asyncio.run(scenario())
    assert depth_after_cancel == 1
    assert abandoned.cancelled()
    assert 7.0 not in forward.values_seen()


def test_a_job_past_its_deadline_times_out_and_is_not_computed():
    forward = RecordingForward()

    async def scenario():
        batcher = make_batcher({"denoising": forward})
        batcher.start()
        blocker = await hold_worker(batcher, forward)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit("denoising", tiles_of(5.0, count=2), deadline=time.monotonic() + 0.1)
        depth = batcher.queued_tiles
        forward.gate.set()
        await blocker
        await batcher.close()
        return depth

    assert asyncio.run(scenario()) == 0
    assert 5.0 not in forward.values_seen()


def test_a_failing_batch_fails_only_its_own_callers_and_the_worker_goes_on():
    forward = RecordingForward(fail_on_value=9.0)

    async def scenario():
        batcher = make_batcher({"denoising": forward}, max_batch_size=2, max_wait_s=0.2)
        batcher.start()
        outcomes = await asyncio.gather(batcher.submit("denoising", tiles_of(9.0)),
                                        batcher.submit("denoising", tiles_of(1.0)),
                                        batcher.submit("denoising", tiles_of(2.0)),
                                        return_exceptions=True)
        later = await batcher.submit("denoising", tiles_of(3.0))
        running = batcher.running
        await batcher.close()
        return outcomes, later, running

    outcomes, later, running = asyncio.run(scenario())
    assert isinstance(outcomes[0], RuntimeError) and isinstance(outcomes[1], RuntimeError)
    assert float(outcomes[2].outputs.max()) == 4.0
    assert float(later.outputs.max()) == 6.0 and running


def test_the_event_loop_keeps_running_during_a_forward_pass():
    # The forward pass ends only when the event loop has done something while it ran: run on the
    # loop's own thread, it would block the loop and wait in vain.
    entered, loop_ran = threading.Event(), threading.Event()

    def forward(batch):
        entered.set()
        assert loop_ran.wait(30), "the event loop stood still while the forward pass ran"
        return batch

    async def scenario():
        batcher = make_batcher({"denoising": forward}, max_wait_s=0)
        batcher.start()
        submitted = asyncio.create_task(batcher.submit("denoising", tiles_of(1.0)))
        await until(entered.is_set)  # polled on the loop, so the loop is running
        loop_ran.set()
        result = await submitted
        await batcher.close()
        return result

    assert float(asyncio.run(scenario()).outputs.max()) == 1.0


def test_a_worker_that_dies_is_restarted():
    class FlakyObserver:
        def __init__(self):
            self.calls = 0

        def batch_finished(self, task, size, seconds, worker):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("observer bug")

    observer = FlakyObserver()

    async def scenario():
        batcher = make_batcher({"denoising": RecordingForward()}, max_wait_s=0, observer=observer)
        batcher.start()
        first = await batcher.submit("denoising", tiles_of(1.0))
        second = await batcher.submit("denoising", tiles_of(2.0))
        running = batcher.running
        await batcher.close()
        return first, second, running

    first, second, running = asyncio.run(scenario())
    assert float(first.outputs.max()) == 2.0 and float(second.outputs.max()) == 4.0
    assert running and observer.calls == 2


def test_close_finishes_queued_work_within_the_grace_and_refuses_new_work():
    forward = RecordingForward()

    async def scenario():
        batcher = make_batcher({"denoising": forward})
        batcher.start()
        blocker = await hold_worker(batcher, forward)
        queued = asyncio.create_task(batcher.submit("denoising", tiles_of(1.0)))
        await until(lambda: batcher.queued_tiles == 1)
        closing = asyncio.create_task(batcher.close(grace_s=30))
        # Tasks start in the order they were made, so close() has begun when this submit runs.
        late = asyncio.create_task(batcher.submit("denoising", tiles_of(2.0)))
        with pytest.raises(QueueClosed):
            await late
        forward.gate.set()
        await closing
        return await blocker, await queued, batcher.running

    blocked, queued, running = asyncio.run(scenario())
    assert float(queued.outputs.max()) == 2.0 and not running


def test_arguments_are_checked_up_front():
    with pytest.raises(ValueError):
        make_batcher({})
    with pytest.raises(ValueError):
        Batcher(workers={}, max_batch_size=4, max_wait_s=0, max_queued_tiles=16)
    with pytest.raises(TypeError):
        make_batcher({"denoising": "not callable"})
    with pytest.raises(ValueError):
        make_batcher({"denoising": RecordingForward()}, max_batch_size=0)
    with pytest.raises(ValueError):
        make_batcher({"denoising": RecordingForward()}, max_wait_s=-1)

    async def scenario():
        batcher = make_batcher({"denoising": RecordingForward()})
        with pytest.raises(QueueClosed):
            await batcher.submit("denoising", tiles_of(1.0))
        batcher.start()
        with pytest.raises(KeyError):
            await batcher.submit("deraining", tiles_of(1.0))
        with pytest.raises(ValueError):
            await batcher.submit("denoising", np.zeros((0, 3, 8, 8), np.float32))
        await batcher.close()

    asyncio.run(scenario())
