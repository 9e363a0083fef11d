"""PyTorch against OpenVINO on the CPU: per-tile time, output agreement, conversion and compile cost.

    python -m bench.backend_bench                      # bundled denoising weights, 2 threads, 7 rounds
    python -m bench.backend_bench --sides 512 480 --rounds 9 --json runs/backend.json
    python -m bench.backend_bench --compare-routes     # also time OpenVINO's direct PyTorch conversion

Each backend runs in its own process (two runtimes' thread pools in one process slow each other
down). Each round runs every variant once, in a rotated order, with a pause between calls so one
runtime's idle-spinning threads do not eat the next one's time; the medians (and minima) over
rounds are reported. Variants per tile side:

- ``torch``: ``Engine.forward``, eager fp32, channels-last (the service's CPU default);
- ``openvino static``: a runner whose serving tile is this side (static-shape compiled model);
- ``openvino dynamic``: a runner with another tile side, so this side runs on its dynamic model.

Start-up is measured twice with one fresh cache folder: cold (convert, compile) and warm (what a
restart pays with the disk cache).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models import load_model, sha256_file
from service.devices import cpu_summary
from service.engine import Engine
from service.openvino_runner import OpenVinoRunner, openvino_available

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "models" / "weights" / "denoising.safetensors"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1 / mse))


def _worker(connection, backend: str, weights: str, tile: int, threads: int, cache_dir: str) -> None:
    """One backend in its own process, so neither runtime's thread pool runs beside the other's.

    Replies to the parent: its start-up report first, then for each ("run", side, keep) the seconds
    one forward pass of a seeded (1, 3, side, side) batch took, and the output when ``keep``.
    """
    torch.set_num_threads(threads)
    model = load_model(weights)
    started = time.perf_counter()
    if backend == "torch":
        runner = Engine(model, device="cpu", tile_size=tile)
        startup = {}
    else:
        runner = OpenVinoRunner(model, weights_sha256=sha256_file(weights), tile_size=tile, threads=threads,
                                cache_dir=cache_dir)
        startup = {"conversion_s": round(runner.conversion_seconds, 2),
                   "converted_from_cache": runner.converted_from_cache}
    runner.warmup(1)
    startup["total_s"] = round(time.perf_counter() - started, 2)
    if backend != "torch":
        startup["compiles"] = runner.compile_log
    connection.send(startup)
    while (message := connection.recv()) is not None:
        _, side, keep = message
        tiles = np.random.default_rng(side).random((1, 3, side, side), dtype=np.float32)
        started = time.perf_counter()
        restored = runner.forward(tiles)
        connection.send((time.perf_counter() - started, restored if keep else None))


class Worker:
    def __init__(self, backend: str, args, tile: int, cache_dir: str):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, backend, args.weights, tile, args.threads,
                                                             cache_dir), daemon=True)
        self.process.start()
        self.startup = self.connection.recv()

    def run(self, side: int, keep: bool = False):
        self.connection.send(("run", side, keep))
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def conversion_routes(model) -> dict:
    """OpenVINO's direct conversion of the module: its time and its agreement on an 8-px-high input."""
    import openvino

    class Stage3(torch.nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, tiles):
            return self.network(tiles)[0].clamp(0, 1)

    reference = Stage3(model).eval()
    started = time.perf_counter()
    with torch.no_grad():
        direct = openvino.convert_model(reference, example_input=torch.rand(2, 3, 64, 96))
    seconds = time.perf_counter() - started
    compiled = openvino.Core().compile_model(direct, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    agreement = {}
    for shape in ((1, 3, 8, 16), (1, 3, 64, 96)):
        tiles = np.random.default_rng(0).random(shape, dtype=np.float32)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(tiles)).numpy()
        agreement["x".join(map(str, shape[2:]))] = round(psnr(compiled(tiles)[0], expected), 1)
    return {"direct_conversion_s": round(seconds, 2), "direct_psnr_db": agreement}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 480])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between timed calls")
    parser.add_argument("--compare-routes", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    reason = openvino_available()
    if reason:
        raise SystemExit(f"OpenVINO backend unavailable: {reason}")
    report = {"cpu": cpu_summary(), "threads": args.threads, "weights": Path(args.weights).name,
              "load_average_before": os.getloadavg()}
    print(f"CPU: {report['cpu']['model']}, {report['cpu']['cores']} cores, flags {report['cpu']['flags']}")

    serving, *others = args.sides
    with tempfile.TemporaryDirectory() as cache:
        # Cold: an empty cache. Warm: the same start again, as a restart would make it.
        cold = Worker("openvino", args, serving, cache)
        report["cold_start"] = cold.startup
        cold.close()
        print("cold start:", report["cold_start"])
        workers = {"torch": Worker("torch", args, max(args.sides), cache),
                   f"openvino tile {serving}": Worker("openvino", args, serving, cache)}
        report["warm_start"] = workers[f"openvino tile {serving}"].startup
        print("warm start:", report["warm_start"])
        for side in others:
            workers[f"openvino tile {side}"] = Worker("openvino", args, side, cache)

        report["sides"] = {}
        for side in args.sides:
            outputs = {name: worker.run(side, keep=True)[1] for name, worker in workers.items()}  # untimed
            times = {name: [] for name in workers}
            names = list(workers)
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    time.sleep(args.pause)
                    times[name].append(workers[name].run(side)[0])
            result = {}
            for name, values in times.items():
                label = name if name == "torch" else ("openvino static" if name == f"openvino tile {side}"
                                                      else f"openvino dynamic ({name})")
                row = {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
                       "all_s": [round(value, 3) for value in values]}
                if name != "torch":
                    row["psnr_vs_torch_db"] = round(psnr(outputs[name], outputs["torch"]), 1)
                    row["speedup_median"] = round(statistics.median(times["torch"]) / statistics.median(values), 2)
                result[label] = row
            report["sides"][side] = result
            print(f"\n{side}x{side}, batch 1, {args.threads} threads, {args.rounds} rounds:")
            for label, row in result.items():
                extra = (f"  {row['speedup_median']}x torch, {row['psnr_vs_torch_db']} dB"
                         if "psnr_vs_torch_db" in row else "")
                print(f"  {label:32s} median {row['median_s']:.3f} s  min {row['min_s']:.3f} s{extra}")
        for worker in workers.values():
            worker.close()

    if args.compare_routes:
        torch.set_num_threads(args.threads)
        report["routes"] = {"onnx_conversion_s": report["cold_start"]["conversion_s"],
                            **conversion_routes(load_model(args.weights))}
        print("\nconversion routes:", report["routes"])
    report["load_average_after"] = os.getloadavg()
    print("load average before/after:", report["load_average_before"], report["load_average_after"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
