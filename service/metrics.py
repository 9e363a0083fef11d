"""Prometheus metrics of one app instance.

Each app owns its registry, so two apps in one process (tests, a future multi-model host) never
share counters, and nothing here is a module global. Values that already live elsewhere (queue
depth, CUDA memory) are read when scraped rather than mirrored into gauges that could drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ServiceMetrics", "CONTENT_TYPE_LATEST", "UNKNOWN_TASK"]

# Label value for requests naming a task this instance does not serve: the path segment itself
# would let any client create label values without bound.
UNKNOWN_TASK = "unknown"

# From a small tile on a GPU (milliseconds) to a large image queued behind others on a CPU (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TILE_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_MEGAPIXEL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 16, 24, 32, 64)


def _batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    # Every size up to 8 (where batching first pays off), then doublings, and always the
    # configured maximum, so "were batches full?" can be read off the histogram.
    sizes = {size for size in range(1, 9)}
    size = 16
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    sizes.add(max_batch_size)
    return tuple(sorted(s for s in sizes if s <= max_batch_size))


class _ScrapeTimeGauges(Collector):
    """Gauges computed by a callable at scrape time."""

    def __init__(self, read: Callable[[], Iterable[GaugeMetricFamily]]):
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self._read()


class ServiceMetrics:
    """Every metric the service exports, registered in a registry of its own.

    Args:
        max_batch_size: the largest batch, used for the batch-size histogram's buckets.
    """

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("mprnet_requests", "Restore requests answered, by task and HTTP status code.",
                                ["task", "code"], registry=registry)
        self.request_duration = Histogram(
            "mprnet_request_duration_seconds", "Restore request time, first byte received to response ready.",
            ["task"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram(
            "mprnet_queue_wait_seconds",
            "Per request, time its tiles spent queued rather than being computed.",
            ["task"], buckets=_LATENCY_BUCKETS, registry=registry)
        # `device` names the inference worker: its device, with "#i" after it when one device
        # has several workers. Its values are as few as the workers, fixed at start-up.
        self.batch_inference = Histogram(
            "mprnet_batch_inference_seconds", "Time of one batched forward pass on the device.",
            ["task", "device"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "mprnet_batch_size", "Tiles per forward pass.", ["task", "device"],
            buckets=_batch_size_buckets(max_batch_size), registry=registry)
        self.request_tiles = Histogram(
            "mprnet_request_tiles", "Tiles one request's image was cut into.", ["task"],
            buckets=_TILE_COUNT_BUCKETS, registry=registry)
        self.image_megapixels = Histogram(
            "mprnet_image_megapixels", "Size of decoded uploads in megapixels.", ["task"],
            buckets=_MEGAPIXEL_BUCKETS, registry=registry)
        self.in_flight = Gauge("mprnet_requests_in_flight", "Restore requests being handled now.", ["task"],
                               registry=registry)
        self.streams_open = Gauge("mprnet_progress_streams_open",
                                  "Restores answering as an event stream (Accept: text/event-stream) now.", ["task"],
                                  registry=registry)
        self.cancelled_by_client = Counter(
            "mprnet_restores_cancelled_by_client",
            "Restores whose client went away before the answer (closed the connection or the event stream); "
            "their queued tiles were dropped.", ["task"], registry=registry)
        self.model_info = Info("mprnet_model", "The model serving each task.", ["task"], registry=registry)
        # Alerts compare the queue depth with this instead of a copy of the configured bound.
        self.queue_capacity = Gauge("mprnet_queue_capacity_tiles",
                                    "The queue's bound in tiles; past it, requests get 503.", registry=registry)
        self.readiness = Gauge("mprnet_ready", "1 while /readyz answers 200 (models warm, not draining), else 0.",
                               registry=registry)
        self._queue_depth: Callable[[], Mapping[str, int]] = dict
        self._worker_names: tuple[str, ...] = ()
        self._stalled_workers: Callable[[], Mapping[str, float]] = dict
        self._cuda_devices: list[torch.device] = []
        registry.register(_ScrapeTimeGauges(self._scrape_time_gauges))
        ProcessCollector(registry=registry)

    # -- called by the batching queue ---------------------------------------------------------

    def batch_finished(self, task: str, size: int, seconds: float, worker: str) -> None:
        self.batch_size.labels(task, worker).observe(size)
        self.batch_inference.labels(task, worker).observe(seconds)

    # -- wiring -------------------------------------------------------------------------------

    def watch_queue(self, depth_by_task: Callable[[], Mapping[str, int]]) -> None:
        """Report ``depth_by_task()`` (queued tiles per task) as a gauge on every scrape."""
        self._queue_depth = depth_by_task

    def watch_workers(self, names: Iterable[str], stalled: Callable[[], Mapping[str, float]]) -> None:
        """Report, per worker in ``names``, whether ``stalled()`` (worker -> seconds its forward
        pass has run past the limit) lists it, on every scrape."""
        self._worker_names = tuple(names)
        self._stalled_workers = stalled

    def add_model(self, task: str, description: Mapping[str, object]) -> None:
        """Publish an engine's description (``device`` may list several, comma-separated); on
        CUDA also start reporting each device's memory."""
        self.model_info.labels(task).info({key: str(value) for key, value in description.items()})
        # Series that exist at 0 from the start, so that a dashboard or an alert sees "none yet"
        # rather than "no data" until the first stream or cancellation.
        self.streams_open.labels(task)
        self.cancelled_by_client.labels(task)
        for name in str(description.get("device", "cpu")).split(","):
            device = torch.device(name)
            if device.type == "cuda" and device not in self._cuda_devices:
                self._cuda_devices.append(device)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _scrape_time_gauges(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("mprnet_queue_depth_tiles", "Tiles waiting for a forward pass.",
                                  labels=["task"])
        for task, tiles in sorted(self._queue_depth().items()):
            depth.add_metric([task], tiles)
        yield depth
        # Says why mprnet_ready went to 0 when a forward pass hangs; `device` names the worker,
        # as in the batch metrics.
        stalled_now = self._stalled_workers()
        stalled = GaugeMetricFamily("mprnet_worker_stalled",
                                    "1 while the worker's forward pass has run past worker_stall_timeout_s "
                                    "(readiness is off then), else 0.", labels=["device"])
        for name in self._worker_names:
            stalled.add_metric([name], float(name in stalled_now))
        yield stalled
        if not self._cuda_devices:
            return
        allocated = GaugeMetricFamily("mprnet_cuda_memory_allocated_bytes",
                                      "CUDA memory held by tensors.", labels=["device"])
        reserved = GaugeMetricFamily("mprnet_cuda_memory_reserved_bytes",
                                     "CUDA memory held by PyTorch's caching allocator.", labels=["device"])
        for device in self._cuda_devices:
            allocated.add_metric([str(device)], torch.cuda.memory_allocated(device))
            reserved.add_metric([str(device)], torch.cuda.memory_reserved(device))
        yield allocated
        yield reserved
