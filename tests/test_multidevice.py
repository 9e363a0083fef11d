"""Several inference workers sharing one batching queue: the queue alone with plain functions as
workers, then the real service with ``devices=cpu,cpu`` (two workers on the one CPU, which is
how a several-GPU machine is exercised without GPUs)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.batching import Batcher, QueueFull
from service.config import Settings
from service.engine import Engine, resolve_devices
from service.tiling import Tiling

from service_helpers import decode_png, encode, finished, metric_value, random_image, running_server, until

pytestmark = pytest.mark.timeout(300)  # hangs fail; a slow shared CI machine does not


def numbered_tiles(count: int, side: int = 8, start: float = 0.0) -> np.ndarray:
    """``count`` tiles, tile i filled with ``start + i``, so order and origin can be checked."""
    values = start + np.arange(count, dtype=np.float32)
    return values[:, None, None, None] * np.ones((1, 3, side, side), np.float32)


class Worker:
    """A forward function that doubles its batch after ``seconds``, records what it ran, can be
    held shut, and can be made to fail.

    ``meet``: a barrier shared with another worker; the first batch of each waits there until the
    other is in a batch too, so a test knows (rather than hopes) that both ran at once.
    """

    def __init__(self, seconds: float = 0.0, fails: bool = False, meet: threading.Barrier | None = None):
        self.seconds = seconds
        self.fails = fails
        self.meet = meet
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.busy = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.busy.set()
        assert self.gate.wait(30), "the test never released the worker"
        if self.meet is not None:
            meet, self.meet = self.meet, None
            meet.wait(30)  # BrokenBarrierError, failing the batch, if the other never got one meanwhile
        time.sleep(self.seconds)  # the work, not a wait for anything
        self.batches.append(batch.copy())
        self.busy.clear()
        if self.fails:
            raise RuntimeError("simulated device fault")
        return batch * 2

    def values(self) -> set[float]:
        return {float(v) for batch in self.batches for v in np.unique(batch)}


def two_worker_batcher(first: Worker, second: Worker, **overrides) -> Batcher:
    options = dict(max_batch_size=2, max_wait_s=0.05, max_queued_tiles=32)
    options.update(overrides)
    return Batcher(workers={"a": {"denoising": first}, "b": {"denoising": second}}, **options)


# -- the queue with plain functions ---------------------------------------------------------------

def test_one_large_job_runs_on_both_workers_at_once_and_comes_back_in_order():
    meet = threading.Barrier(2)  # both workers in a batch of the one job at the same time
    first, second = Worker(seconds=0.3, meet=meet), Worker(seconds=0.3, meet=meet)

    async def scenario():
        batcher = two_worker_batcher(first, second)
        batcher.start()
        started = time.monotonic()
        result = await batcher.submit("denoising", numbered_tiles(8))
        wall = time.monotonic() - started
        await batcher.close()
        return result, wall

    result, wall = asyncio.run(scenario())
    np.testing.assert_array_equal(result.outputs, numbered_tiles(8) * 2)
    assert first.batches and second.batches and len(first.batches) + len(second.batches) == 4
    assert first.values() | second.values() == set(range(8)) and not first.values() & second.values()
    # Inference time counts the overlapping batches once, so it fits inside the job's own time,
    # and it covers at least one lane's batches, which ran one after another.
    assert result.inference_seconds + result.queue_seconds <= wall + 1e-6
    assert result.inference_seconds >= 0.3 * max(len(first.batches), len(second.batches))


def test_while_one_worker_waits_for_a_batch_to_fill_the_other_serves_other_queues():
    first, second = Worker(), Worker()

    async def scenario():
        # A lone small tile would wait an hour for company: a full batch of another shape that
        # arrives after it and waited behind it would fail the guard.
        batcher = two_worker_batcher(first, second, max_batch_size=4, max_wait_s=3600)
        batcher.start()
        lone = asyncio.create_task(batcher.submit("denoising", numbered_tiles(1, side=8)))
        await finished(batcher.submit("denoising", numbered_tiles(4, side=16, start=10.0)), "the full batch")
        lone_was_waiting = not lone.done()
        await finished(batcher.submit("denoising", numbered_tiles(3, side=8, start=20.0)), "the lone tile's company")
        lone_result = await finished(lone, "the lone tile")
        await batcher.close()
        return lone_was_waiting, lone_result

    lone_was_waiting, lone_result = asyncio.run(scenario())
    assert lone_was_waiting
    assert float(lone_result.outputs.max()) == 0.0
    # The lone tile went into one batch with the company that came later: it had waited for it.
    assert [len(batch) for batch in first.batches + second.batches if batch.shape[-1] == 8] == [4]


def test_requests_are_spread_over_the_workers_and_each_gets_its_own_tiles():
    meet = threading.Barrier(2)
    first, second = Worker(seconds=0.05, meet=meet), Worker(seconds=0.05, meet=meet)

    async def scenario():
        batcher = two_worker_batcher(first, second, max_batch_size=2, max_wait_s=0.01)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("denoising", numbered_tiles(3, start=10.0 * n))
                                         for n in range(6)))
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    for n, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs, numbered_tiles(3, start=10.0 * n) * 2)
    assert first.batches and second.batches
    assert sum(len(b) for b in first.batches + second.batches) == 18


def test_a_failing_worker_fails_only_the_batches_it_ran():
    meet = threading.Barrier(2)
    broken, healthy = Worker(seconds=0.05, fails=True, meet=meet), Worker(seconds=0.05, meet=meet)

    async def scenario():
        batcher = two_worker_batcher(broken, healthy, max_batch_size=1, max_wait_s=0)
        batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit("denoising", numbered_tiles(1, start=float(n)))
                                          for n in range(8)), return_exceptions=True)
        running = batcher.running
        await batcher.close()
        return outcomes, running

    outcomes, running = asyncio.run(scenario())
    failed = {n for n, outcome in enumerate(outcomes) if isinstance(outcome, RuntimeError)}
    assert failed == {int(v) for v in broken.values()} and failed
    for n in set(range(8)) - failed:
        assert float(outcomes[n].outputs.max()) == 2.0 * n
    assert {int(v) for v in healthy.values()} == set(range(8)) - failed
    assert running


def test_a_worker_whose_loop_dies_is_restarted_alone():
    class CrashOnce:
        def __init__(self):
            self.crashed_in: str | None = None

        def batch_finished(self, task, size, seconds, worker):
            if self.crashed_in is None:
                self.crashed_in = worker
                raise RuntimeError("observer bug")

    observer = CrashOnce()
    first, second = Worker(seconds=0.05), Worker(seconds=0.05)

    async def scenario():
        batcher = two_worker_batcher(first, second, max_batch_size=1, max_wait_s=0, observer=observer)
        batcher.start()
        loops_before = {worker.name: worker.loop_task for worker in batcher._workers}
        results = await asyncio.gather(*(batcher.submit("denoising", numbered_tiles(1, start=float(n)))
                                         for n in range(6)))
        await until(lambda: batcher.running)
        loops_after = {worker.name: worker.loop_task for worker in batcher._workers}
        await batcher.close()
        return results, loops_before, loops_after

    results, before, after = asyncio.run(scenario())
    assert [float(r.outputs.max()) for r in results] == [2.0 * n for n in range(6)]
    crashed = observer.crashed_in
    other = "b" if crashed == "a" else "a"
    assert after[crashed] is not before[crashed] and before[crashed].exception() is not None
    assert after[other] is before[other]  # the other worker never noticed


class BatchSeconds:
    """An observer keeping each finished batch's seconds per tile: the speed the batcher learns."""

    def __init__(self):
        self.per_tile: list[float] = []

    def batch_finished(self, task, size, seconds, worker):
        self.per_tile.append(seconds / size)


def test_retry_after_counts_the_workers():
    async def retry_after(worker_count: int) -> tuple[int, float]:
        workers = [Worker(seconds=0.14) for _ in range(worker_count)]
        learned = BatchSeconds()
        batcher = Batcher(workers={str(i): {"denoising": w} for i, w in enumerate(workers)},
                          max_batch_size=1, max_wait_s=0, max_queued_tiles=8, observer=learned)
        batcher.start()
        await batcher.submit("denoising", numbered_tiles(1))  # learns about 0.14 s a tile
        (seconds_per_tile,) = learned.per_tile
        for worker in workers:
            worker.gate.clear()
        held = [asyncio.create_task(batcher.submit("denoising", numbered_tiles(1))) for _ in workers]
        await until(lambda: all(worker.busy.is_set() for worker in workers))
        queued = asyncio.create_task(batcher.submit("denoising", numbered_tiles(8)))
        await until(lambda: batcher.queued_tiles == 8)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit("denoising", numbered_tiles(1))
        for worker in workers:
            worker.gate.set()
        await asyncio.gather(*held, queued)
        await batcher.close()
        return refused.value.retry_after_s, seconds_per_tile

    # 8 tiles at the speed measured (0.14 s a tile when idle: 2 s in one lane, 1 s in two),
    # from the measurement itself, so a slow machine changes the numbers, not the outcome.
    for worker_count in (1, 2):
        estimate, seconds_per_tile = asyncio.run(retry_after(worker_count))
        assert estimate == max(1, math.ceil(8 * seconds_per_tile / worker_count)), (worker_count, seconds_per_tile)


def test_workers_are_checked_up_front():
    with pytest.raises(TypeError):
        Batcher(max_batch_size=1, max_wait_s=0, max_queued_tiles=1)
    with pytest.raises(ValueError):
        Batcher(workers={}, max_batch_size=1, max_wait_s=0, max_queued_tiles=1)
    with pytest.raises(ValueError, match="same tasks"):
        Batcher(workers={"a": {"denoising": Worker()}, "b": {"deraining": Worker()}},
                max_batch_size=1, max_wait_s=0, max_queued_tiles=1)


# -- settings -------------------------------------------------------------------------------------

def test_the_devices_setting(monkeypatch):
    assert Settings().devices is None
    monkeypatch.setenv("MPRNET_DEVICES", "cpu, cpu")
    assert Settings().devices == ("cpu", "cpu")
    assert [str(d) for d in resolve_devices(Settings().devices)] == ["cpu", "cpu"]
    monkeypatch.setenv("MPRNET_DEVICES", "")
    assert Settings().devices is None
    assert Settings(devices="all").devices == ("all",)
    if not torch.cuda.is_available():
        assert [str(d) for d in resolve_devices(("all",))] == ["cpu"]
    for bad in ("all,cpu", "tpu", "cuda:x"):
        with pytest.raises(ValueError, match="devices"):
            Settings(devices=bad)


# -- the real service on two CPU workers ----------------------------------------------------------

TILE, OVERLAP = 32, 8


@pytest.fixture(scope="module")
def weights(tiny_weights) -> Path:
    return tiny_weights(31)


def two_cpu_settings(weights: Path, **overrides) -> Settings:
    options = dict(tasks="denoising", weights_denoising=weights, devices="cpu,cpu", tile_size=TILE,
                   tile_overlap=OVERLAP, max_batch_size=2, max_batch_wait_ms=5, max_queued_tiles=64,
                   max_pixels=96 * 96, request_timeout_s=30, graceful_shutdown_s=2, log_level="warning")
    options.update(overrides)
    return Settings(**options)


async def post_all(url: str, images: list[np.ndarray]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/restore/denoising", files={"image": ("i.png", encode(image))})
                                      for image in images))


def test_two_cpu_workers_share_the_requests_and_each_answer_is_its_own(weights):
    offline = Engine.from_checkpoint(weights, device="cpu", tile_size=TILE)
    # 48 x 40 is four 32-pixel tiles: two full batches, one for each worker.
    images = [random_image(48, 40, seed=seed) for seed in range(6)]
    with running_server(two_cpu_settings(weights)) as server:
        models = httpx.get(f"{server.url}/v1/models").json()
        responses = asyncio.run(post_all(server.url, images))
        metrics = server.metrics()
    assert models["workers"] == ["cpu#0", "cpu#1"]
    assert models["models"]["denoising"]["devices"] == ["cpu", "cpu"]
    for image, response in zip(images, responses):
        assert response.status_code == 200, response.text
        restored = np.asarray(decode_png(response.content))
        # Batched and single forward passes may round differently in the last float bit.
        assert restored.shape == image.shape
        expected = Tiling(TILE, overlap=OVERLAP).restore(image, offline.forward)
        assert int(np.abs(restored.astype(int) - expected).max()) <= 1
    per_worker = {name: metric_value(metrics, "mprnet_batch_size_count", task="denoising", device=name)
                  for name in ("cpu#0", "cpu#1")}
    assert all(count >= 1 for count in per_worker.values()), per_worker
    tiles = metric_value(metrics, "mprnet_batch_size_sum", task="denoising")
    assert tiles == 6 * 4


def test_a_fault_on_one_worker_fails_only_the_requests_it_was_computing(weights, monkeypatch):
    real_forward = Engine.forward
    poisoned: set[int] = set()
    ran_on: dict[str, list[float]] = {"poisoned": [], "healthy": []}
    both_busy, met = threading.Barrier(2), set()

    def forward(self, tiles):
        if poisoned and id(self) not in met:
            # Each worker's first request waits until the other worker has one too, so both get
            # requests however the machine schedules them (not armed during the warm-up).
            met.add(id(self))
            both_busy.wait(30)
        if id(self) in poisoned:
            ran_on["poisoned"].append(float(tiles.mean()))
            raise RuntimeError("simulated fault on one device")
        ran_on["healthy"].append(float(tiles.mean()))
        return real_forward(self, tiles)

    monkeypatch.setattr(Engine, "forward", forward)
    images = [random_image(16, 16, seed=40 + n) for n in range(6)]
    # Engine.forward is what is made to fault here: the PyTorch backend.
    with running_server(two_cpu_settings(weights, max_batch_size=1, backend="torch")) as server:
        poisoned.add(id(server.service.workers["cpu#1"]["denoising"]))
        ran_on["healthy"].clear()  # the warm-up passes
        responses = asyncio.run(post_all(server.url, images))
        still_ready = httpx.get(f"{server.url}/readyz").status_code
        metrics = server.metrics()
    codes = [response.status_code for response in responses]
    assert sorted(codes) == sorted([200] * len(ran_on["healthy"]) + [500] * len(ran_on["poisoned"]))
    assert ran_on["poisoned"] and ran_on["healthy"], codes
    for response in responses:
        if response.status_code == 500:
            assert response.json()["error"]["code"] == "inference_failed"
    assert still_ready == 200
    assert metric_value(metrics, "mprnet_batch_size_count", device="cpu#1") == 0
    assert metric_value(metrics, "mprnet_batch_size_count", device="cpu#0") == len(ran_on["healthy"])
