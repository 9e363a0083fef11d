"""The GPU fast path checked on a real device in one short run, each part on its own:

The network is the one the service serves, the bundled weights' configuration (n_feat 16): the
fast-path switches are service settings, and their defaults are chosen for it. It is small enough
that a GPU waits on kernel launches more than on arithmetic, which is what graphs and compilation
address. (bench/model_bench.py and bench/loadgen.py time the released configurations.)

* ``auto_sizing``: what ``Engine.choose_sizes`` decides for it in bf16, and the bytes per pixel
  it decides from (first, while the device is still empty);
* ``graphs_vs_eager``: CUDA graph replay against eager, fp32 with TF32 off, tile 256, batch 2:
  the largest difference and the PSNR between the two outputs;
* ``graph_batches``: bf16 graphs at tile 512 for batches of 1, 4 and 8 (max_batch_size 8): each
  capture's time, milliseconds per batch replayed and eager, and the device memory after capture;
* ``compiled_shape``: ``torch.compile`` of one shape (tile 512, batch 1, bf16): warm-up time,
  milliseconds per forward against eager, and whether anything compiled after warm-up.

    python -m bench.fastpath_check --device cuda --json fastpath.json
    python -m bench.fastpath_check --device cpu                # the same report, CUDA-only parts skipped
    python -m bench.fastpath_check --device cuda --dry         # tiny network and tiles: checks this script

The networks have random weights: speed and memory are the trained ones', and graphs against
eager compares two ways of running one network. A part that fails records its error and the
others still run. A part that would not finish inside ``--time-budget`` is skipped and says so;
the report is rewritten after every part, and if a part overruns the budget by more than
``_GRACE_S`` the report is written with that part marked and the process exits (torch.compile
cannot be interrupted), so that a caller's own time limit never loses what was measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.model_bench import BUNDLED_CONFIG, tf32
from models import MPRNetConfig
from service.engine import Engine

# The tests' tiny network (TINY_ARCHITECTURE in tests/service_helpers.py, which needs the web stack to import).
TINY_CONFIG = MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, reduction=2)
_GRACE_S = 10
_REPEATS = 5

# Seconds each part is expected to take, by device; a part starts only if that much of the budget
# is left. Compiling the bundled network for one shape took 47.5 s on an H200 machine's 16 cores
# (BENCHMARKS.md), hence 60; on the project's 2-core CPU VM compiling even the tiny
# network took 178 s (measured, with an empty compile cache), so the default budget skips it there.
_ESTIMATES_S = {
    "cuda": {"auto_sizing": 10, "graphs_vs_eager": 15, "graph_batches": 30, "compiled_shape": 60},
    "cpu": {"auto_sizing": 2, "compiled_shape": 240},
}


class Report:
    """The JSON report, written after every part and by the watchdog, from either thread."""

    def __init__(self, path: Path | None, header: dict):
        self.path, self.data, self.lock = path, {**header, "parts": {}}, threading.Lock()

    def set(self, name: str, result: dict) -> None:
        with self.lock:
            self.data["parts"][name] = result
            self._write()

    def finish(self, **fields) -> None:
        with self.lock:
            self.data.update(fields)
            self._write()

    def _write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def _network(config: MPRNetConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return config.build()


def _tiles(count: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, side, side), dtype=np.float32)


def _ms_per_forward(engine: Engine, tiles: np.ndarray, repeats: int = _REPEATS) -> float:
    """Median milliseconds of ``engine.forward`` (host arrays in and out, so the device is done)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.forward(tiles)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def _free_device_memory(device: torch.device) -> None:
    """Frees what finished parts left cached, so that the next part's memory figures are its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def auto_sizing(setup: argparse.Namespace) -> dict:
    engine = Engine(_network(setup.config), device=setup.device, precision=setup.half, cuda_graphs=False)
    tile_size, batch_size = engine.choose_sizes()
    result = {"precision": setup.half, "tile_size": tile_size, "batch_size": batch_size}
    if setup.device.type != "cuda":
        return {**result, "skipped": "bytes per pixel: measured on CUDA only; the CPU keeps the default sizes"}
    free, total = torch.cuda.mem_get_info(setup.device)
    return {**result, "bytes_per_pixel": round(engine.bytes_per_pixel), "free_bytes": free, "total_bytes": total}


def graphs_vs_eager(setup: argparse.Namespace) -> dict:
    side, count = setup.small_tile, 2
    model = _network(setup.config)
    tiles = _tiles(count, side, seed=1)
    with tf32(False):
        eager = Engine(model, device=setup.device, tile_size=side, max_batch_size=count, cuda_graphs=False)
        graphed = Engine(model, device=setup.device, tile_size=side, max_batch_size=count, cuda_graphs=True)
        graphed.warmup()
        expected, replayed = eager.forward(tiles), graphed.forward(tiles)
    difference = replayed.astype(np.float64) - expected
    mse = float(np.mean(difference ** 2))
    return {"tile": side, "batch": count, "precision": "fp32", "tf32": False,
            "graphed_sizes": sorted(graphed._graphs), "failed_captures": sorted(graphed._failed_captures),
            "max_abs_difference": float(np.abs(difference).max()),
            # Identical outputs have no finite PSNR, and JSON has no infinity: None, with identical saying why.
            "psnr_db": round(10 * math.log10(1 / mse), 2) if mse else None, "identical": mse == 0}


def graph_batches(setup: argparse.Namespace) -> dict:
    side, sizes, largest = setup.large_tile, (1, 4, 8), 8
    model = _network(setup.config)
    options = dict(device=setup.device, precision=setup.half, tile_size=side, max_batch_size=largest)
    # Eager first: its warm-up autotunes cuDNN for every batch shape, so that the captures after it
    # time capturing, not autotuning.
    eager = Engine(model, cuda_graphs=False, **options)
    started = time.perf_counter()
    eager.warmup(largest)
    eager_warmup_s = time.perf_counter() - started
    eager_ms = {size: _ms_per_forward(eager, _tiles(size, side, seed=size)) for size in sizes}
    del eager
    _free_device_memory(setup.device)
    allocated_before = torch.cuda.memory_allocated(setup.device)
    graphed = Engine(model, cuda_graphs=True, **options)
    capture_s = {}
    # Largest first, as warm-up captures them, so that the smaller graphs share the largest one's memory.
    for size in sorted(graphed.batch_shapes(), reverse=True):
        started = time.perf_counter()
        with torch.inference_mode():
            graphed._graph_for(size)  # three eager passes on the side stream, then the capture
        torch.cuda.synchronize(setup.device)
        capture_s[size] = round(time.perf_counter() - started, 3)
    memory = {"allocated_before_capture_bytes": allocated_before,
              "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(setup.device),
              "memory_reserved_bytes": torch.cuda.memory_reserved(setup.device)}
    per_size = {}
    for size in sizes:
        replay_ms = _ms_per_forward(graphed, _tiles(size, side, seed=size))
        per_size[str(size)] = {"capture_s": capture_s[size], "replay_ms": replay_ms, "eager_ms": eager_ms[size],
                               "eager_over_replay": round(eager_ms[size] / replay_ms, 3)}
    return {"tile": side, "precision": setup.half, "max_batch_size": largest, "captured": sorted(graphed._graphs),
            "failed_captures": sorted(graphed._failed_captures), "capture_s": capture_s,
            "eager_warmup_s": round(eager_warmup_s, 2), "sizes": per_size, **memory,
            "timing": f"median of {_REPEATS} Engine.forward calls, host arrays in and out"}


def compiled_shape(setup: argparse.Namespace) -> dict:
    side = setup.large_tile
    model = _network(setup.config)
    options = dict(device=setup.device, precision=setup.half, tile_size=side, max_batch_size=1)
    tiles = _tiles(1, side, seed=3)
    eager = Engine(model, cuda_graphs=False, **options)
    eager.warmup()
    eager_ms = _ms_per_forward(eager, tiles)
    compiled = Engine(model, compile=True, **options)
    started = time.perf_counter()
    compiled.warmup()
    warmup_s = time.perf_counter() - started
    at_warmup = compiled.compiled_graphs
    compiled_ms = _ms_per_forward(compiled, tiles)
    after_warmup = compiled.compiled_graphs - at_warmup
    import torch._dynamo

    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", None)
    return {"tile": side, "batch": 1, "precision": setup.half, "warmup_s": round(warmup_s, 1),
            "compiled_ms": compiled_ms, "eager_ms": eager_ms, "eager_over_compiled": round(eager_ms / compiled_ms, 3),
            "graphs_compiled_at_warmup": at_warmup, "graphs_compiled_after_warmup": after_warmup,
            "recompiled": after_warmup > 0, "dynamo_recompile_limit": limit}


PARTS = {"auto_sizing": auto_sizing, "graphs_vs_eager": graphs_vs_eager, "graph_batches": graph_batches,
         "compiled_shape": compiled_shape}
_CUDA_ONLY = {"graphs_vs_eager", "graph_batches"}


def _summary_line(name: str, result: dict) -> str:
    shown = {key: value for key, value in result.items() if not isinstance(value, dict)}
    return f"{name}: " + ", ".join(f"{key} {value}" for key, value in shown.items())


def _watchdog(report: Report, running: dict, deadline: float) -> None:
    """Past the deadline and its grace, writes the report with the running part marked, and exits."""
    while time.monotonic() < deadline + _GRACE_S:
        time.sleep(0.5)
    name = running.get("name")
    if name is None:
        return
    report.set(name, {"status": "error", "error": f"still running {_GRACE_S} s past the time budget; stopped"})
    report.finish(total_s=round(time.monotonic() - running["started"], 1), stopped=True)
    print(f"{name}: stopped, still running {_GRACE_S} s past the time budget", flush=True)
    os._exit(3)


def _setup(args: argparse.Namespace) -> argparse.Namespace:
    device = torch.device(args.device)
    small = args.dry or device.type != "cuda"
    # bf16 is the GPU's serving precision; a CPU without bf16 instructions would emulate it slowly.
    half = "bf16" if device.type == "cuda" else "fp32"
    return argparse.Namespace(
        device=device, half=half, config=TINY_CONFIG if small else BUNDLED_CONFIG,
        network="tiny (the tests')" if small else "bundled", small_tile=64 if small else 256,
        large_tile=64 if small else 512)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--json", type=Path, help="write the report here as well")
    parser.add_argument("--dry", action="store_true",
                        help="the tiny network and 64 px tiles on --device: checks this script in seconds")
    parser.add_argument("--time-budget", type=float, default=150,
                        help="seconds for the whole run; parts that would not fit are skipped (default 150)")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no usable CUDA device")
    started = time.monotonic()
    deadline = started + args.time_budget
    setup = _setup(args)
    header = {"device": str(setup.device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if setup.device.type == "cuda" else None,
              "gpu": torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else None,
              "network": setup.network + " configuration, random weights", "dry": args.dry,
              "time_budget_s": args.time_budget}
    report = Report(args.json, header)
    print(", ".join(f"{key} {value}" for key, value in header.items()), flush=True)
    running = {"started": started}
    threading.Thread(target=_watchdog, args=(report, running, deadline), daemon=True).start()
    estimates = _ESTIMATES_S[setup.device.type]
    for name, part in PARTS.items():
        left = deadline - time.monotonic()
        if name in _CUDA_ONLY and setup.device.type != "cuda":
            result = {"status": "skipped", "reason": "CUDA graphs need a CUDA device"}
        elif left < estimates[name]:
            result = {"status": "skipped",
                      "reason": f"needs about {estimates[name]} s, {max(left, 0):.0f} s of the budget left"}
        else:
            running["name"] = name
            part_started = time.monotonic()
            try:
                result = {"status": "ok", **part(setup)}
            except Exception as error:  # recorded; the other parts still run
                result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
            running["name"] = None
            result["seconds"] = round(time.monotonic() - part_started, 1)
            _free_device_memory(setup.device)
        report.set(name, result)
        print(_summary_line(name, result), flush=True)
        for key, value in result.items():
            if isinstance(value, dict):
                print(f"  {key}: {json.dumps(value)}", flush=True)
    total = round(time.monotonic() - started, 1)
    report.finish(total_s=total)
    print(f"total {total} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
