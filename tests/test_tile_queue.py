"""The queue's policy: which job's tiles go into the next batch."""

from __future__ import annotations

import asyncio

import numpy as np

from service.tile_queue import Job, TileQueue


def _job(loop, task: str, tiles: int, side: int = 8, arrived: float = 0.0, deadline: float | None = None) -> Job:
    pixels = np.zeros((tiles, 3, side, side), dtype=np.float32)
    return Job(task=task, tiles=pixels, outputs=np.empty_like(pixels), future=loop.create_future(),
               deadline=deadline, enqueued_at=arrived)


def _serve(queue: TileQueue, batch_size: int, now: float = 0.0) -> list[Job]:
    """Jobs in the order their tiles are taken, one entry per tile."""
    order = []
    while (key := queue.next_key(now, skip=set())) is not None:
        batch = queue.take(key, batch_size, now)
        order += [job for job, _, count in batch.parts for _ in range(count)]
    return order


def test_a_job_arriving_while_a_large_one_runs_is_served_next():
    loop = asyncio.new_event_loop()
    queue = TileQueue(("denoising",), on_expired=lambda job: None)
    large = _job(loop, "denoising", 60, side=64, arrived=0.0)
    queue.add(large)
    for _ in range(5):  # the large job is being served
        queue.take(queue.next_key(0.0, set()), 1, 0.0)
    small = _job(loop, "denoising", 1, side=16, arrived=1.0)  # another shape, another group
    queue.add(small)
    assert _serve(queue, batch_size=1)[0] is small
    loop.close()


def test_the_tiles_taken_until_a_new_job_is_done_count_fair_turns_not_the_whole_backlog():
    loop = asyncio.new_event_loop()
    for waiting, new in [((60,), 3), ((60, 2), 4), ((5, 5), 10), ((), 7)]:
        queue = TileQueue(("denoising",), on_expired=lambda job: None)
        for count in waiting:
            queue.add(_job(loop, "denoising", count))
        predicted = queue.tiles_until_done(new)
        job = _job(loop, "denoising", new, arrived=1.0)
        queue.add(job)
        order = _serve(queue, batch_size=1)
        taken_until_done = len(order) - order[::-1].index(job)
        # Ties between equal tags may put one other tile before the new job's last one.
        assert abs(predicted - taken_until_done) <= 1, (waiting, new, predicted, taken_until_done)
    loop.close()


def test_jobs_waiting_together_share_the_device_tile_by_tile():
    loop = asyncio.new_event_loop()
    queue = TileQueue(("denoising", "deblurring"), on_expired=lambda job: None)
    first, second = _job(loop, "denoising", 4, arrived=0.0), _job(loop, "deblurring", 4, arrived=0.5)
    queue.add(first)
    queue.add(second)
    assert _serve(queue, batch_size=1) == [first, second] * 4
    assert queue.queued_tiles == 0


def test_a_batch_is_filled_from_several_jobs_of_its_group_fairly():
    loop = asyncio.new_event_loop()
    queue = TileQueue(("denoising",), on_expired=lambda job: None)
    jobs = [_job(loop, "denoising", 6, arrived=index) for index in range(3)]
    for job in jobs:
        queue.add(job)
    batch = queue.take(queue.next_key(0.0, set()), 6, 0.0)
    taken = {id(job): 0 for job in jobs}
    for job, _, count in batch.parts:
        taken[id(job)] += count
    assert sorted(taken.values()) == [2, 2, 2] and len(batch.tiles) == 6
    assert queue.queued_tiles == 12 and queue.depth_by_task() == {"denoising": 12}


def test_expired_jobs_leave_and_released_jobs_stop_counting():
    loop = asyncio.new_event_loop()
    expired = []
    queue = TileQueue(("denoising",), on_expired=lambda job: (expired.append(job), job.future.cancel(),
                                                                 queue.release(job)))
    late = _job(loop, "denoising", 3, deadline=1.0)
    gone = _job(loop, "denoising", 2, arrived=0.1)
    kept = _job(loop, "denoising", 2, arrived=0.2)
    for job in (late, gone, kept):
        queue.add(job)
    gone.future.cancel()
    queue.release(gone)
    assert queue.queued_tiles == 5
    assert _serve(queue, batch_size=4, now=2.0) == [kept, kept]
    assert expired == [late] and queue.queued_tiles == 0
