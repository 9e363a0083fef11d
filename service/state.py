"""What the request handlers share: settings, metrics, the engines' batching queue, readiness.

:meth:`ServiceState.load` loads and warms every task's network on every device in the
background after start-up; readiness turns true only when all are warm and the queue is open.
:meth:`ServiceState.restore` is one upload's path: decode and cut in a thread, tiles through
the queue, stitch and encode in a thread.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from models import load_checkpoint
from models.weights import changed_since_install

from .backends import build_engine, resolve_backend
from .batching import Batcher, QueueClosed
from .config import Settings, default_queued_tiles
from .decoding import DecoderPool, available_cpus
from .engine import Engine, resolve_devices
from .errors import ServiceError
from .memory import MemoryBudget
from .metrics import ServiceMetrics
from .pipeline import RestorePipeline
from .progress import RestoreProgress
from .schemas import ModelCard
from .tiling import Tiling

__all__ = ["ServiceState", "Restored", "Upload"]

log = logging.getLogger(__name__)


class Upload:
    """An upload's bytes, handed on exactly once, so that no frame keeps a 32 MiB body alive
    while the request goes on."""

    def __init__(self, data: bytes):
        self._data: bytes | None = data
        self.size = len(data)

    def take(self) -> bytes:
        data, self._data = self._data, None
        if data is None:
            raise RuntimeError("the upload was already taken")
        return data


class Restored:
    """A restored upload: the PNG, its size, and the seconds each stage took, in the order they ran."""

    def __init__(self, png: bytes, width: int, height: int, timings: dict[str, float]):
        self.png = png
        self.width, self.height = width, height
        self.timings = timings


class ServiceState:
    """Everything the request handlers share; built by ``create_app``, one per app."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ServiceMetrics(settings.max_batch_size)
        self.metrics.queue_capacity.set(settings.max_queued_tiles)
        self.metrics.readiness.set_function(lambda: float(self.ready))
        self.pipeline = self._pipeline()
        self.workers: dict[str, dict[str, Engine]] = {}  # worker name -> task -> its engine
        self.cards: dict[str, ModelCard] = {}
        self._said_why_torch = False
        self.batcher: Batcher | None = None
        self.draining = False
        # Restores running now, and whether shutdown has stopped them (see begin_draining).
        self._in_flight: set[asyncio.Task] = set()
        self._stopped_in_flight = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.load_error: str | None = None
        # Called when the models cannot be loaded; `serve` uses it to exit instead of idling unready.
        self.on_load_failure: Callable[[], None] | None = None
        self.budget = MemoryBudget(settings.max_inflight_bytes, settings.max_inflight_pixels)
        self.decoders: DecoderPool | None = None  # started with the models: spawning takes a moment
        # Cutting, stitching and encoding; sized to the CPUs this process may use (its cgroup
        # quota, not the host's count), so a burst cannot starve the inference thread.
        self.imaging_pool = ThreadPoolExecutor(max_workers=available_cpus(), thread_name_prefix="mprnet-imaging")

    def _pipeline(self) -> RestorePipeline:
        settings = self.settings
        return RestorePipeline(Tiling(settings.tile_size, settings.tile_overlap), max_pixels=settings.max_pixels,
                               max_tiles=settings.max_queued_tiles)

    @property
    def ready(self) -> bool:
        # A stalled worker still answers nothing while its forward pass hangs: every request
        # routed here would time out, so readiness goes off until the pass returns.
        return (self.batcher is not None and self.batcher.running and not self.batcher.stalled_workers()
                and not self.draining and self.load_error is None)

    def not_ready_reason(self) -> str:
        if self.load_error is not None:
            return f"the models failed to load: {self.load_error}"
        if self.draining:
            return "the service is shutting down"
        if self.batcher is None:
            return "the models are still loading"
        stalled = self.batcher.stalled_workers()
        if stalled:
            running = ", ".join(f"{name} for {seconds:.0f} s" for name, seconds in stalled.items())
            return (f"inference worker stalled: a forward pass has been running on {running}, past the "
                    f"{self.stall_limit_s:g} s limit (worker_stall_timeout_s)")
        return "the inference worker is restarting"

    @property
    def stall_limit_s(self) -> float:
        """How long one forward pass may run before its worker counts as stalled."""
        return self.settings.worker_stall_timeout_s or self.settings.request_timeout_s

    def queue_refusal(self) -> ServiceError | None:
        """The 503 to answer before reading an upload, while the queue has no room for a tile."""
        if self.batcher is not None and self.batcher.full:
            return ServiceError(503, "queue_full", "the inference queue is full; retry later",
                                {"Retry-After": str(self.batcher.retry_after_s())})
        return None

    async def run_in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.imaging_pool, function, *args)

    def begin_draining(self, stop_in_flight_after_s: float) -> None:
        """Readiness off; restores still running ``stop_in_flight_after_s`` from now fail with
        ``QueueClosed`` (503 ``not_ready``). Safe to call from a signal handler.

        The server cancels what is left when its grace period ends, and a handler cancelled there
        answers a bare text 500 and cuts an event stream without its last event; stopped a moment
        before, each gets the API's 503 and a client knows to send the image again.
        """
        self.draining = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.call_later, max(0.0, stop_in_flight_after_s),
                                            self._stop_in_flight)

    def _stop_in_flight(self) -> None:
        self._stopped_in_flight = True
        for running in list(self._in_flight):
            running.cancel()

    async def restore(self, task: str, upload: Upload, deadline: float, entry: dict,
                      progress: RestoreProgress | None = None) -> Restored:
        """The upload's bytes -> restored PNG; ``entry`` (the request's log line) gains the image's facts,
        ``progress`` the tiles as they finish.

        Raises the domain errors of each stage (:mod:`service.errors` maps them to HTTP), and
        ``QueueClosed`` once shutdown stops the restores in flight. Every array of the request is
        released when this returns or raises, with no reference cycle left to wait for the
        garbage collector.
        """
        # Never a local: an error's traceback holds this frame, and the task holds the error; a
        # reference from the frame back to the task would keep the request's arrays in a cycle.
        self._in_flight.add(asyncio.current_task())
        try:
            if self._stopped_in_flight:
                raise QueueClosed("the service is shutting down; send the image again")
            return await self._restore(task, upload, deadline, entry, progress)
        except asyncio.CancelledError:
            if not self._stopped_in_flight:
                raise  # its client left, or its deadline passed
            raise QueueClosed("the service shut down before the image was restored; send it again") from None
        finally:
            self._in_flight.discard(asyncio.current_task())

    async def _restore(self, task: str, upload: Upload, deadline: float, entry: dict,
                       progress: RestoreProgress | None) -> Restored:
        metrics = self.metrics
        timings: dict[str, float] = {}
        mark = time.monotonic()
        decoded = await self.decoders.decode(upload.take())
        with self.budget.holding_pixels(decoded.width * decoded.height):
            prepared = await self.run_in_thread(self.pipeline.cut, decoded)
            del decoded
            timings["decode"] = time.monotonic() - mark
            image, tiles = prepared.decoded, prepared.tiles
            width, height = image.width, image.height
            entry.update(width=width, height=height, format=image.format, tiles=len(tiles))
            metrics.image_megapixels.labels(task).observe(image.width * image.height / 1e6)
            metrics.request_tiles.labels(task).observe(len(tiles))
            del image
            # The queue holds the tiles from here on, and writes the outputs over them.
            prepared.tiles = None
            on_progress = None
            if progress is not None:
                progress.started(len(tiles), self.batcher.expected_seconds(len(tiles)))
                on_progress = progress.tiles_finished
            result = await self.batcher.submit(task, tiles, deadline, on_progress)
            del tiles
            timings["queue"], timings["inference"] = result.queue_seconds, result.inference_seconds
            metrics.queue_wait.labels(task).observe(result.queue_seconds)
            entry.update(queue_ms=round(result.queue_seconds * 1000, 2),
                         inference_ms=round(result.inference_seconds * 1000, 2))
            mark = time.monotonic()
            png = await self.run_in_thread(self.pipeline.finish, prepared, result.outputs)
            timings["encode"] = time.monotonic() - mark
        return Restored(png, width, height, timings)

    async def load(self) -> None:
        """Load and warm every task's engine on every device, then open the queue; readiness follows."""
        self._loop = asyncio.get_running_loop()
        try:
            settings = self.settings
            self.decoders = await asyncio.to_thread(DecoderPool, settings.decode_workers, settings.max_pixels,
                                                    settings.decode_timeout_s)
            await self._load_engines()
            settings = self.settings  # automatic sizing may have replaced the tile shape, batch and queue bound
            batcher = Batcher(workers={name: {task: engine.forward for task, engine in engines.items()}
                                       for name, engines in self.workers.items()},
                              max_batch_size=settings.max_batch_size, max_wait_s=settings.max_batch_wait_ms / 1000,
                              max_queued_tiles=settings.max_queued_tiles, observer=self.metrics,
                              stall_after_s=self.stall_limit_s)
        except Exception as exc:  # reported through readiness and the log instead, and the process exits
            self.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("cannot serve: %s", self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        batcher.start()
        self.metrics.watch_queue(batcher.depth_by_task)
        self.metrics.watch_workers(tuple(self.workers), batcher.stalled_workers)
        self.batcher = batcher
        log.info("ready: serving %s", ", ".join(self.cards))

    async def _load_engines(self) -> None:
        devices = resolve_devices(self.settings.devices or (self.settings.device,))
        names = _worker_names(devices)
        sized = not (self.settings.auto_size and devices[0].type == "cuda")
        for task in self.settings.tasks:
            path = self.settings.weights_path(task)
            try:
                await self._load_task(task, path, devices, names, sized)
            except Exception as error:
                if str(path) in str(error):
                    raise
                # Errors past the checkpoint's own checks (a forward pass at warm-up, a backend's
                # conversion) name neither; the operator needs both.
                raise RuntimeError(f"{task} from {path}: {error}") from error
            sized = True

    async def _load_task(self, task: str, path: Path, devices: list[torch.device], names: list[str],
                         sized: bool) -> None:
        """One task's engine on every device, warmed up; the first one loaded sizes the tiles
        when automatic sizing is on (``sized`` False)."""
        started = time.monotonic()
        device_list = [str(device) for device in devices]
        checkpoint = await asyncio.to_thread(load_checkpoint, path)
        changed = changed_since_install(path, checkpoint.sha256)
        if changed:
            # Served all the same, as it was configured, but `weights list` marks it unusable.
            log.warning("serving %s from weights changed since they were installed: %s", task, changed)
        # A copy per worker, made before any is moved: Engine moves its model onto its device in place.
        models = [checkpoint.model, *(copy.deepcopy(checkpoint.model) for _ in devices[1:])]
        if not sized:
            await asyncio.to_thread(self._choose_sizes, models[0], devices[0])
        settings = self.settings
        for name, device, model in zip(names, devices, models):
            engine = await asyncio.to_thread(functools.partial(
                build_engine, checkpoint, model, self._backend_for(device), device=device,
                precision=settings.precision, tile_size=settings.tile_size, max_batch_size=settings.max_batch_size,
                channels_last=settings.channels_last, compile=settings.compile, cuda_graphs=settings.cuda_graphs,
                allow_emulated_precision=settings.allow_emulated_precision, cache_dir=settings.model_cache_dir))
            # A full batch, so that the largest allocation happens now, not under load.
            await asyncio.to_thread(engine.warmup, settings.max_batch_size)
            self.workers.setdefault(name, {})[task] = engine
        engine = self.workers[names[0]][task]
        description = {**engine.describe(), "tile_overlap": settings.tile_overlap}
        self.cards[task] = ModelCard(weights_file=path.name, weights_sha256=checkpoint.sha256,
                                     devices=device_list, **description)
        # Without the weights' digest, which /v1/models gives behind the API key: /metrics is
        # often left open to the scraper.
        self.metrics.add_model(task, {**description.pop("architecture"), **description,
                                      "device": ",".join(dict.fromkeys(device_list))})
        log.info("loaded %s from %s (sha256 %s, %d parameters) on %s in %.1f s", task, path,
                 checkpoint.sha256[:12], engine.parameter_count, ", ".join(names), time.monotonic() - started)

    def _backend_for(self, device: torch.device) -> str:
        backend, why_not_openvino = resolve_backend(self.settings.backend, device, self.settings.precision)
        if why_not_openvino and device.type == "cpu" and not self._said_why_torch:
            log.info("running on PyTorch on the CPU: %s", why_not_openvino)
            self._said_why_torch = True
        return backend

    def _choose_sizes(self, model: torch.nn.Module, device: torch.device) -> None:
        """Automatic sizing, decided once from the first task on the first device: every worker
        and task shares the queue's one tile shape and batch limit. max_batch_size stays the
        ceiling, and the queue grows if the largest upload would no longer fit in it."""
        settings = self.settings
        probe = Engine(model, device=device, precision=settings.precision, channels_last=settings.channels_last,
                       allow_emulated_precision=settings.allow_emulated_precision)
        tile_size, batch = probe.choose_sizes()
        batch = min(batch, settings.max_batch_size)
        queued = max(settings.max_queued_tiles,
                     default_queued_tiles(settings.max_pixels, tile_size, settings.tile_overlap))
        self.settings = settings.model_copy(update={"tile_size": tile_size, "max_batch_size": batch,
                                                    "max_queued_tiles": queued})
        self.pipeline = self._pipeline()
        self.metrics.queue_capacity.set(queued)
        log.info("auto sizing: tile_size %d, max_batch_size %d, max_queued_tiles %d", tile_size, batch, queued)

    async def close(self) -> None:
        self.draining = True
        if self.batcher is not None:
            await self.batcher.close(grace_s=self.settings.graceful_shutdown_s)
        if self.decoders is not None:
            self.decoders.close()
        # Not cancel_futures: a request whose tiles finished during the drain still has its PNG
        # to encode in this pool.
        self.imaging_pool.shutdown(wait=False)


def _worker_names(devices: list) -> list[str]:
    """Each worker's name: its device, numbered ("cpu#0", "cpu#1") where a device has several,
    so that metrics tell their batches apart."""
    counts, seen = Counter(map(str, devices)), Counter()
    names = []
    for device in map(str, devices):
        names.append(device if counts[device] == 1 else f"{device}#{seen[device]}")
        seen[device] += 1
    return names
