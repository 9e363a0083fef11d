"""Overload on loopback: many more clients than the service can serve, for a bounded time.

Starts ``python -m service serve`` in a child process with a tiny random MPRNet, then:

1. **capacity**: a few closed-loop clients (enough to fill batches, not the queue) measure how
   many images per second the service restores when it is not overloaded;
2. **overload**: ``--clients`` closed-loop clients (64 by default) for ``--duration`` seconds.

While both run, the server's resident memory is sampled from ``/proc/<pid>/status`` (and its
kernel-kept peak, ``VmHWM``, read at the end) and the queue depth gauge from ``/metrics``.
Printed: 200/503/504/other counts, throughput against capacity, latency percentiles of the
accepted requests, peak memory, the deepest queue seen, and whether each promise held:

* the queue never went past its bound (so refusals, not memory, absorb the excess);
* resident memory stayed under ``--rss-bound-mb``;
* every accepted request finished within its deadline (plus a second for the trip back) or got 504;
* throughput under overload stayed at least ``--min-throughput-ratio`` of capacity.

The exit status is 1 when one of them did not. Traffic goes to 127.0.0.1 only.

    python -m bench.overload --clients 64 --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.service_helpers import TINY_ARCHITECTURE, ServingProcess, serving_process, tiny_checkpoint


@dataclass
class Outcomes:
    statuses: Counter = field(default_factory=Counter)
    latency_by_status: dict[int, list[float]] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)

    def record(self, status: int, seconds: float) -> None:
        self.statuses[status] += 1
        self.latency_by_status.setdefault(status, []).append(seconds)


@dataclass
class Samples:
    rss_kib: list[int] = field(default_factory=list)
    queue_depth: list[float] = field(default_factory=list)
    scrape_failures: int = 0


def _status_kib(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(re.search(rf"^{name}:\s+(\d+) kB", handle.read(), re.M).group(1))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        # Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _queue_depth(metrics_text: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples if sample.name == "mprnet_queue_depth_tiles")


def _server_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {sample.labels["code"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "mprnet_requests_total"}


class Sampler(threading.Thread):
    """Memory and queue depth every ``interval`` seconds, in its own thread and connection, so a
    busy client loop does not thin out the samples."""

    def __init__(self, pid: int, url: str, interval: float):
        super().__init__(daemon=True)
        self.pid, self.url, self.interval = pid, url, interval
        self.samples = Samples()
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stopping.is_set():
                self.samples.rss_kib.append(_status_kib(self.pid, "VmRSS"))
                try:
                    self.samples.queue_depth.append(_queue_depth(client.get(f"{self.url}/metrics").text))
                except httpx.HTTPError:
                    self.samples.scrape_failures += 1
                self.stopping.wait(self.interval)


@contextmanager
def started_server(args: argparse.Namespace, folder: Path) -> Iterator[ServingProcess]:
    """`python -m service serve` with a tiny random network (the tests' own), until it is ready."""
    weights = tiny_checkpoint(folder / "tiny-denoising.safetensors", seed=0)
    # Logging at warning level: per-request info lines would cost the server CPU under this load.
    settings = dict(MPRNET_TASKS="denoising", MPRNET_WEIGHTS_DENOISING=str(weights), MPRNET_DEVICE="cpu",
                    MPRNET_TILE_SIZE=str(args.tile_size), MPRNET_TILE_OVERLAP="8",
                    MPRNET_MAX_BATCH_SIZE=str(args.max_batch_size), MPRNET_MAX_BATCH_WAIT_MS="10",
                    MPRNET_MAX_QUEUED_TILES=str(args.max_queued_tiles),
                    MPRNET_REQUEST_TIMEOUT_S=str(args.request_timeout), MPRNET_LOG_LEVEL="warning")
    with serving_process(settings, wait_ready=False) as served:
        try:
            served.wait_ready(timeout=120)
        except AssertionError as error:
            raise SystemExit(f"the server never became ready: {error}") from None
        yield served


def make_uploads(size: int, count: int = 8) -> list[bytes]:
    rng = np.random.default_rng(0)
    uploads = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        uploads.append(buffer.getvalue())
    return uploads


async def drive(url: str, clients: int, seconds: float, uploads: list[bytes], pause_after_refusal: float) -> Outcomes:
    """``clients`` closed-loop clients; only requests that both start and end inside the window count."""
    outcomes = Outcomes()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120), limits=limits) as client:
        window_end = time.monotonic() + seconds

        async def one_client(index: int) -> None:
            sent = index
            while time.monotonic() < window_end:
                data = uploads[sent % len(uploads)]
                sent += 1
                started = time.monotonic()
                try:
                    response = await client.post("/v1/restore/denoising", files={"image": ("b.png", data, "image/png")})
                except httpx.HTTPError as error:
                    outcomes.errors[type(error).__name__] += 1
                    continue
                finished = time.monotonic()
                if finished <= window_end:
                    outcomes.record(response.status_code, finished - started)
                if response.status_code == 503:
                    # A client that retries at once after a refusal: the harshest one that still
                    # lets this process leave some CPU to the server.
                    await asyncio.sleep(pause_after_refusal)

        await asyncio.gather(*(one_client(index) for index in range(clients)))
    return outcomes


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50_ms": round(p50 * 1000, 1), "p95_ms": round(p95 * 1000, 1), "p99_ms": round(p99 * 1000, 1),
            "max_ms": round(max(values) * 1000, 1)}


def run(args: argparse.Namespace) -> dict:
    uploads = make_uploads(args.size)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mprnet-overload-") as folder, started_server(args, Path(folder)) as served:
        process, url = served.process, served.url
        try:
            asyncio.run(drive(url, args.capacity_clients, args.warmup, uploads, args.pause_after_refusal))
            # CPU seconds of server and load generator per phase: on a shared machine they say
            # whether a drop in throughput came from the service or from its neighbours.
            cpu = {"capacity": [_cpu_seconds(process.pid), time.process_time()]}
            capacity = asyncio.run(drive(url, args.capacity_clients, args.capacity_duration, uploads,
                                         args.pause_after_refusal))
            cpu["capacity"] = [_cpu_seconds(process.pid) - cpu["capacity"][0], time.process_time() - cpu["capacity"][1]]
            counts_before = _server_counts(url)
            sampler = Sampler(process.pid, url, args.sample_interval)
            sampler.start()
            cpu["overload"] = [_cpu_seconds(process.pid), time.process_time()]
            overload = asyncio.run(drive(url, args.clients, args.duration, uploads, args.pause_after_refusal))
            cpu["overload"] = [_cpu_seconds(process.pid) - cpu["overload"][0], time.process_time() - cpu["overload"][1]]
            sampler.stopping.set()
            sampler.join()
            peak_rss_kib = _status_kib(process.pid, "VmHWM")
            counts_after = _server_counts(url)
            after = httpx.post(f"{url}/v1/restore/denoising", files={"image": ("b.png", uploads[0], "image/png")},
                               timeout=60)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                exit_code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                exit_code = None
    load_after = os.getloadavg()

    capacity_rate = capacity.statuses[200] / args.capacity_duration
    overload_rate = overload.statuses[200] / args.duration
    accepted_latencies = overload.latency_by_status.get(200, [])
    late = sum(seconds > args.request_timeout + 1 for seconds in accepted_latencies)
    max_depth = max(sampler.samples.queue_depth, default=0)
    server_growth = {code: counts_after.get(code, 0) - counts_before.get(code, 0)
                     for code in sorted(set(counts_after) | set(counts_before))}
    checks = {
        "queue_bound_held": max_depth <= args.max_queued_tiles,
        "rss_under_bound": peak_rss_kib / 1024 <= args.rss_bound_mb,
        "accepted_within_deadline_or_504": late == 0 and not overload.errors,
        "throughput_near_capacity": capacity_rate > 0 and overload_rate >= args.min_throughput_ratio * capacity_rate,
        "serves_after_overload": after.status_code == 200,
        "sigterm_exit_0": exit_code == 0,
    }
    return {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_1m_before": round(load_before[0], 2),
                    "load_average_1m_after": round(load_after[0], 2)},
        "settings": {"clients": args.clients, "duration_s": args.duration, "capacity_clients": args.capacity_clients,
                     "capacity_duration_s": args.capacity_duration, "image": f"{args.size}x{args.size} PNG",
                     "tile_size": args.tile_size, "max_batch_size": args.max_batch_size,
                     "max_queued_tiles": args.max_queued_tiles, "request_timeout_s": args.request_timeout,
                     "pause_after_503_s": args.pause_after_refusal, "model": TINY_ARCHITECTURE},
        "cpu_share_of_one_core": {
            phase: {"server": round(server / length, 2), "load_generator": round(client / length, 2)}
            for (phase, (server, client)), length in zip(cpu.items(), (args.capacity_duration, args.duration))},
        "capacity": {"images_per_s": round(capacity_rate, 2), "statuses": dict(capacity.statuses),
                     **percentiles(capacity.latency_by_status.get(200, []))},
        "overload": {"images_per_s": round(overload_rate, 2),
                     "throughput_vs_capacity": round(overload_rate / capacity_rate, 3) if capacity_rate else None,
                     "statuses": dict(overload.statuses), "client_errors": dict(overload.errors),
                     "accepted": percentiles(accepted_latencies),
                     "refused_503": percentiles(overload.latency_by_status.get(503, [])),
                     "accepted_later_than_deadline": late,
                     "server_counted": server_growth},
        "server": {"peak_rss_mb": round(peak_rss_kib / 1024, 1),
                   "sampled_rss_mb": {"min": round(min(sampler.samples.rss_kib) / 1024, 1),
                                      "max": round(max(sampler.samples.rss_kib) / 1024, 1)},
                   "rss_bound_mb": args.rss_bound_mb,
                   "queue_depth_max_sampled": max_depth, "queue_samples": len(sampler.samples.queue_depth),
                   "sample_interval_s": args.sample_interval,
                   "metrics_scrape_failures": sampler.samples.scrape_failures,
                   "exit_code": exit_code},
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients during the overload")
    parser.add_argument("--duration", type=float, default=40, help="seconds of overload")
    parser.add_argument("--capacity-clients", type=int, default=8, help="clients when measuring capacity")
    parser.add_argument("--capacity-duration", type=float, default=15, help="seconds of the capacity measurement")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of traffic before measuring")
    parser.add_argument("--size", type=int, default=64, help="side of the square test images, pixels")
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-queued-tiles", type=int, default=16)
    parser.add_argument("--request-timeout", type=float, default=10)
    parser.add_argument("--pause-after-refusal", type=float, default=0.05, help="seconds a client waits after a 503")
    parser.add_argument("--rss-bound-mb", type=float, default=1024, help="resident memory the server must stay under")
    parser.add_argument("--min-throughput-ratio", type=float, default=0.8,
                        help="overload throughput must reach this share of capacity")
    parser.add_argument("--sample-interval", type=float, default=0.1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.duration > 600 or args.capacity_duration > 600:
        parser.error("runs are bounded to 10 minutes a phase")
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    failed = [name for name, held in report["checks"].items() if not held]
    print("all checks held" if not failed else f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
