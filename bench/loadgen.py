"""Drive the service with N concurrent clients; compare with the engine's own throughput.

One run measures, on the same images and settings:

1. the engine alone, in this process: ``Engine.restore`` image after image (what a script
   without the service gets), and the forward pass alone over full batches of tiles (the
   ceiling any batching can reach);
2. the service, started here as ``python -m service serve`` in a child process (or one already running, via
   ``--url``), driven by ``--clients`` closed-loop HTTP clients for ``--duration`` seconds after
   ``--warmup`` seconds;
3. the engine alone again; with ``--rounds`` > 1, service and engine phases keep alternating,
   and each service phase is compared with the engine phases on either side of it, so that a
   change in machine load shows up as a difference between engine figures rather than as a
   service overhead.

Throughput counts only 200 responses completed inside the measured window. Batch statistics
come from the service's own ``/metrics``.

    python -m bench.loadgen --clients 8 --duration 60 --size 128x128 --tile-size 128
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import re
import signal
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models import MPRNet, load_checkpoint, save_safetensors
from service.client_results import parse_server_timing
from service.engine import Engine
from service.tiling import Tiling
from tests.service_helpers import ROOT, TINY_ARCHITECTURE, serving_process

KODAK = ROOT.parent / "shared" / "datasets" / "eval" / "Kodak24"
# Widths for a randomly initialised network when no trained weights are at hand; the speed of a
# forward pass depends on the architecture, not on the values of the weights.
RANDOM_CONFIGS = {
    "tiny": TINY_ARCHITECTURE,
    "small": dict(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=2),
    "deraining": dict(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16),
}


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def synthetic_photo(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A photo-like RGB image: smooth shading, a few hard-edged shapes, fine texture and mild noise.

    Without ``--source`` (a device has no ../shared), or for sizes larger than its photos, the
    uploads are made here. Uniform random pixels would not do: they do not compress (2.8 MB at
    720p, twice a photo's PNG) and would flatter or burden the decode, encode and transfer that an
    end-to-end latency includes. At 720p on this project's 2-core EPYC VM, PNG at the service's
    level 1 takes 0.14 s for this image, 0.10 s for a Kodak photo resized to 1280x720, 0.17 s for
    random pixels.
    """
    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    phase = rng.random(6).astype(np.float32) * 6
    image = np.stack([0.5 + 0.3 * np.sin(3 * x + phase[0]) * np.cos(2 * y + phase[1]),
                      0.45 + 0.25 * np.sin(2 * (x + y) + phase[2]),
                      0.4 + 0.3 * np.cos(4 * x - 3 * y + phase[3])], axis=-1)
    for _ in range(6):  # edges for the network to keep sharp
        cy, cx, radius = rng.random(3).astype(np.float32) * (1.0, 1.0, 0.25)
        inside = (y - cy) ** 2 + ((x - cx) * width / height) ** 2 < radius ** 2
        image[inside] = rng.random(3).astype(np.float32) * 0.8 + 0.1
    texture = 0.04 * np.sin(40 * x * (1 + phase[4]) + 25 * y) * np.sin(30 * y * (1 + phase[5]))
    image += texture[..., None] + rng.normal(0, 0.004, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def load_images(count: int, size: tuple[int, int], source: Path | None, seed: int) -> list[np.ndarray]:
    """``count`` RGB crops of ``size`` from the images in ``source``, or synthetic photos without one."""
    rng = np.random.default_rng(seed)
    height, width = size
    files = sorted(source.glob("*.png")) if source and source.is_dir() else []
    images = []
    for index in range(count):
        if not files:
            images.append(synthetic_photo(size, rng))
            continue
        pixels = np.asarray(Image.open(files[index % len(files)]).convert("RGB"))
        if pixels.shape[0] < height or pixels.shape[1] < width:
            # Kodak24's photos are 512x768 or 768x512: a 720p request needs synthetic ones.
            images.append(synthetic_photo(size, rng))
            continue
        top = int(rng.integers(0, pixels.shape[0] - height + 1))
        left = int(rng.integers(0, pixels.shape[1] - width + 1))
        images.append(np.ascontiguousarray(pixels[top:top + height, left:left + width]))
    return images


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def percentile_ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


# -- the engine alone ---------------------------------------------------------------------------

def engine_per_image(engine: Engine, tiling: Tiling, images: list[np.ndarray], batch_size: int,
                     seconds: float) -> dict:
    done, latencies = 0, []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        mark = time.perf_counter()
        tiling.restore(images[done % len(images)], engine.forward, batch_size=batch_size)
        latencies.append(time.perf_counter() - mark)
        done += 1
    elapsed = time.perf_counter() - started
    return {"images_per_s": done / elapsed, "images": done, "p50_ms": percentile_ms(latencies, 50)}


def engine_full_batches(engine: Engine, tiling: Tiling, images: list[np.ndarray], batch_size: int,
                        seconds: float) -> dict:
    tiles = np.concatenate([tiling.cut(image)[1] for image in images])
    tiles_per_image = len(tiles) / len(images)
    # Every batch full, even when the images hold fewer tiles than one batch (8 one-tile images
    # against a batch of 16 would otherwise measure half batches as the ceiling).
    tiles = np.concatenate([tiles] * -(-batch_size // len(tiles)))
    done_tiles = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or done_tiles == 0:
        start = done_tiles % len(tiles)
        batch = tiles[start:start + batch_size]
        engine.forward(batch)
        done_tiles += len(batch)
    elapsed = time.perf_counter() - started
    return {"images_per_s": done_tiles / tiles_per_image / elapsed, "tiles_per_s": done_tiles / elapsed,
            "tiles_per_image": tiles_per_image}


# -- the service --------------------------------------------------------------------------------

def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not become ready within {timeout:g} s")


def batch_counters(url: str, task: str) -> tuple[float, float]:
    """(batches run, tiles computed) so far for ``task``."""
    count = total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.labels.get("task") == task and sample.name == "mprnet_batch_size_count":
                count = sample.value
            elif sample.labels.get("task") == task and sample.name == "mprnet_batch_size_sum":
                total = sample.value
    return count, total


@dataclass
class LoadResult:
    completed: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, status)
    stages: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (start, Server-Timing ms)
    errors: int = 0


async def drive(url: str, task: str, uploads: list[bytes], clients: int, warmup_s: float, duration_s: float,
                timeout_s: float) -> tuple[LoadResult, float, float, tuple[float, float], tuple[float, float]]:
    result = LoadResult()
    begin = time.perf_counter()
    window_start, window_end = begin + warmup_s, begin + warmup_s + duration_s
    counters: dict[str, tuple[float, float]] = {}

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        sent = index
        while time.perf_counter() < window_end:
            data = uploads[sent % len(uploads)]
            sent += clients
            mark = time.perf_counter()
            try:
                response = await client.post(f"/v1/restore/{task}", files={"image": ("bench.png", data, "image/png")})
                result.completed.append((mark, time.perf_counter(), response.status_code))
                if response.status_code == 200:
                    result.stages.append((mark, parse_server_timing(response.headers.get("server-timing"))))
            except httpx.HTTPError:
                result.errors += 1

    async def read_counters_at(when: float, key: str) -> None:
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        counters[key] = await asyncio.to_thread(batch_counters, url, task)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)),
                             read_counters_at(window_start, "start"), read_counters_at(window_end, "end"))
    return result, window_start, window_end, counters["start"], counters["end"]


# -- the run ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="drive this running service instead of starting one "
                                      "(its settings must match the ones given here)")
    parser.add_argument("--task", default="denoising")
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the task's installed or bundled weights, "
                                                     "else a randomly initialised --random-config network)")
    parser.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS), default="small")
    parser.add_argument("--images", type=int, default=8, help="distinct images, sent round-robin")
    parser.add_argument("--size", type=parse_size, default=(256, 256), help="image size HEIGHTxWIDTH")
    parser.add_argument("--source", type=Path, default=KODAK, help="folder of PNGs to crop (default Kodak24)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per round")
    parser.add_argument("--rounds", type=int, default=1, help="service phases, each between two engine phases")
    parser.add_argument("--engine-seconds", type=float, default=None,
                        help="seconds for each engine-only measurement (default: --duration / 2; 0: none, and no "
                             "engine in this process, for a run that needs the service's figures only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-queued-tiles", type=int, default=512)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--torch-threads", type=int,
                        help="intra-op threads for the engine here and (as OMP_NUM_THREADS) in the service; on a "
                             "shared machine 1 avoids OpenMP spin-waiting against other processes")
    parser.add_argument("--serve-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="another service setting for the started service, e.g. channels_last=true (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    engine_seconds = args.duration / 2 if args.engine_seconds is None else args.engine_seconds

    scratch = tempfile.TemporaryDirectory(prefix="mprnet-loadgen-")
    weights = args.weights
    if weights is None:
        try:
            from models.weights import resolve
            weights = resolve(args.task)
        except LookupError:
            weights = Path(scratch.name) / f"random-{args.random_config}.safetensors"
            torch.manual_seed(0)
            save_safetensors(MPRNet(**RANDOM_CONFIGS[args.random_config]), weights)
            print(f"no {args.task} weights installed: using a randomly initialised '{args.random_config}' network")

    images = load_images(args.images, args.size, args.source, seed=0)
    uploads = [png_bytes(image) for image in images]
    architecture = load_checkpoint(weights).config.as_kwargs()
    tiling = Tiling(args.tile_size, args.tile_overlap)
    engine = None
    if engine_seconds > 0:
        engine = Engine.from_checkpoint(weights, device=args.device, precision=args.precision,
                                        tile_size=args.tile_size, max_batch_size=args.max_batch_size)
        engine.warmup(args.max_batch_size)
        # Every shape the engine phases time runs once first: cuDNN's autotuning and the allocator's
        # first growth happen per shape, and would otherwise land in the first measured window.
        tiling.restore(images[0], engine.forward, batch_size=args.max_batch_size)
        engine_full_batches(engine, tiling, images[:1], args.max_batch_size, seconds=0)

    def measure_engine() -> dict:
        if engine is None:
            return {kind: {"images_per_s": math.nan} for kind in ("per_image", "full_batches")}
        print(f"engine alone ({engine_seconds:g} s per mode) ...", flush=True)
        return {"per_image": engine_per_image(engine, tiling, images, args.max_batch_size, engine_seconds),
                "full_batches": engine_full_batches(engine, tiling, images, args.max_batch_size, engine_seconds)}

    settings_env = {
        "MPRNET_TASKS": args.task, f"MPRNET_WEIGHTS_{args.task.upper()}": str(weights),
        "MPRNET_DEVICE": args.device, "MPRNET_PRECISION": args.precision, "MPRNET_TILE_SIZE": str(args.tile_size),
        "MPRNET_TILE_OVERLAP": str(args.tile_overlap), "MPRNET_MAX_BATCH_SIZE": str(args.max_batch_size),
        "MPRNET_MAX_BATCH_WAIT_MS": str(args.max_batch_wait_ms),
        "MPRNET_MAX_QUEUED_TILES": str(args.max_queued_tiles),
        "MPRNET_REQUEST_TIMEOUT_S": str(args.request_timeout),
        "MPRNET_MAX_PIXELS": str(max(args.size[0] * args.size[1], 1)), "MPRNET_LOG_LEVEL": "info",
        # Room for every client's image at once: the default (two images of max_pixels) answers 503 to
        # all but two clients, and a run at concurrency 32 would measure the admission limit.
        "MPRNET_MAX_INFLIGHT_PIXELS": str(max(args.size[0] * args.size[1], 1) * max(2, args.clients)),
    }
    for setting in args.serve_setting:
        name, _, value = setting.partition("=")
        settings_env[f"MPRNET_{name.upper().replace('-', '_')}"] = value
    if args.torch_threads:
        settings_env["OMP_NUM_THREADS"] = str(args.torch_threads)
    exit_code = None
    with ExitStack() as stack:
        url = args.url
        if url is None:
            print("starting the service ...", flush=True)
            served = stack.enter_context(serving_process(settings_env, wait_ready=False))
            url = served.url
            served.wait_ready(timeout=600)
        else:
            served = None
            wait_ready(url)

        # Engine and service phases alternate, and each service phase is compared with the engine
        # phases on either side of it, so that load from other processes that comes and goes
        # lands on both sides of the comparison.
        engine_runs = [measure_engine()]
        rounds = []
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}: driving {url} with {args.clients} clients for "
                  f"{args.warmup:g} + {args.duration:g} s ...", flush=True)
            load, window_start, window_end, (batches_0, tiles_0), (batches_1, tiles_1) = asyncio.run(
                drive(url, args.task, uploads, args.clients, args.warmup, args.duration, args.request_timeout))
            engine_runs.append(measure_engine())
            finished = [(start, end) for start, end, status in load.completed
                        if window_start <= end <= window_end and status == 200]
            # Throughput counts what finished in the window; latency only what also started in it, so
            # that a request sent during the warm-up (and autotuned there) is not timed.
            ok = [end - start for start, end in finished if start >= window_start]
            # Where the time of a request goes, by the service's own account (Server-Timing), median per stage.
            timed = [stages for start, stages in load.stages if window_start <= start <= window_end]
            stage_ms = {name: round(float(np.median([t[name] for t in timed if name in t])), 1)
                        for name in dict.fromkeys(name for t in timed for name in t)}
            statuses: dict[str, int] = {}
            for _, _, status in load.completed:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            rate = len(finished) / (window_end - window_start)
            batches = batches_1 - batches_0
            engine_rate = {kind: (engine_runs[-2][kind]["images_per_s"] + engine_runs[-1][kind]["images_per_s"]) / 2
                           for kind in ("per_image", "full_batches")}
            rounds.append({
                "images_per_s": rate, "completed_in_window": len(finished), "latencies_s": ok,
                "p50_ms": percentile_ms(ok, 50), "p95_ms": percentile_ms(ok, 95), "p99_ms": percentile_ms(ok, 99),
                "statuses": statuses, "transport_errors": load.errors, "server_timing_median_ms": stage_ms,
                "mean_batch_size": (tiles_1 - tiles_0) / batches if batches else None,
                "vs_engine_per_image": rate / engine_rate["per_image"],
                "vs_engine_full_batches": rate / engine_rate["full_batches"],
            })
        if served is not None:
            served.process.send_signal(signal.SIGTERM)
            exit_code = served.process.wait(timeout=120)

    all_latencies = [latency for result in rounds for latency in result.pop("latencies_s")]
    service_rate = float(np.mean([result["images_per_s"] for result in rounds]))
    engine_rate = {kind: float(np.mean([run[kind]["images_per_s"] for run in engine_runs]))
                   for kind in ("per_image", "full_batches")}
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
                    "load_average_at_end": os.getloadavg()},
        "settings": {"task": args.task, "weights": str(weights), "architecture": architecture,
                     "images": args.images, "size": f"{args.size[0]}x{args.size[1]}", "clients": args.clients,
                     "rounds": args.rounds, "warmup_s": args.warmup, "duration_s": args.duration,
                     "engine_seconds": engine_seconds, "tile_size": args.tile_size,
                     "tile_overlap": args.tile_overlap, "max_batch_size": args.max_batch_size,
                     "max_batch_wait_ms": args.max_batch_wait_ms},
        "engine_runs": engine_runs,
        "service_rounds": rounds,
        "summary": {"service_images_per_s": service_rate,
                    "engine_per_image_images_per_s": engine_rate["per_image"],
                    "engine_full_batches_images_per_s": engine_rate["full_batches"],
                    "p50_ms": percentile_ms(all_latencies, 50), "p95_ms": percentile_ms(all_latencies, 95),
                    "p99_ms": percentile_ms(all_latencies, 99),
                    "median_round_vs_engine_per_image": float(np.median([r["vs_engine_per_image"] for r in rounds])),
                    "median_round_vs_engine_full_batches": float(
                        np.median([r["vs_engine_full_batches"] for r in rounds])),
                    "exit_code_after_sigterm": exit_code},
    }
    print(json.dumps(report, indent=2))
    summary = report["summary"]
    print(f"\nservice: {service_rate:.3f} images/s over {args.rounds} round(s) of {args.duration:g} s, "
          f"{args.clients} clients (p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, "
          f"p99 {summary['p99_ms']} ms)")
    for index, result in enumerate(rounds, 1):
        print(f"  round {index}: {result['images_per_s']:.3f} images/s, "
              f"mean batch {result['mean_batch_size'] or 0:.2f}, "
              f"{result['vs_engine_per_image']:.1%} of engine.restore, {result['vs_engine_full_batches']:.1%} of "
              f"full-batch forward (engine runs either side)")
        print(f"    server timing, median ms: {result['server_timing_median_ms']}")
    print(f"engine.restore per image: {engine_rate['per_image']:.3f} images/s; forward on full batches: "
          f"{engine_rate['full_batches']:.3f} images/s (means of {len(engine_runs)} runs)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
