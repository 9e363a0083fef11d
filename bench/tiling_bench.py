"""Tiling's cost in speed: one image restored whole and at several tile sizes, on one device.

The whole-image pass is the reference; each tile size reports megapixels per second of the image
(not of the tiles, so re-computed overlap counts against it), the overhead against the whole
image, and the tile count. The best tile size is the one with the highest throughput.

    .venv/bin/python -m bench.tiling_bench --config bundled --size 96x160 --tiles 32,64 --overlap 8 --repeats 2
    python -m bench.tiling_bench --device cuda --config deblurring --size 720x1280 --tiles 256,384,512,768
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.loadgen import synthetic_photo
from bench.model_bench import BUNDLED_CONFIG
from models import RELEASED_CONFIGS
from service.engine import Engine, is_out_of_memory
from service.tiling import Tiling


def _timed_restore(engine: Engine, tiling: Tiling, image: np.ndarray, batch_size: int, repeats: int) -> list[float]:
    tiling.restore(image, engine.forward, batch_size)  # autotuning and allocations out of the timing
    times = []
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        started = time.perf_counter()
        tiling.restore(image, engine.forward, batch_size)  # returns host pixels, so the device is done
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default="deblurring", help="a released configuration's name, or bundled")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--size", default="720x1280", help="HEIGHTxWIDTH")
    parser.add_argument("--tiles", default="256,384,512,768", help="tile sides to try besides the whole image")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BUNDLED_CONFIG.build() if args.config == "bundled" else RELEASED_CONFIGS[args.config].build()
    height, width = map(int, args.size.split("x"))
    image = synthetic_photo((height, width), np.random.default_rng(0))
    rows = []
    for tile in [0, *map(int, args.tiles.split(","))]:
        overlap = args.overlap if tile else 0
        # max_batch_size is the batch restored with, so the engine's prepared shapes are the ones timed.
        engine = Engine(model, device=args.device, precision=args.precision, tile_size=tile,
                        max_batch_size=args.batch, cuda_graphs=False)  # the whole image has no graph: like for like
        tiling = Tiling(tile, overlap)
        row = {"tile": tile or "whole", "tiles": len(tiling.plan(height, width)), "overlap": overlap}
        try:
            times = _timed_restore(engine, tiling, image, args.batch, args.repeats)
        except Exception as error:  # a size that does not fit is a result
            if not is_out_of_memory(error):
                raise
            rows.append({**row, "error": "out of memory"})
            print(f"tile {row['tile']}: out of memory", flush=True)
            torch.cuda.empty_cache()
            continue
        row.update(seconds_median=statistics.median(times),
                   megapixels_per_s=height * width / statistics.median(times) / 1e6)
        rows.append(row)
        print(f"tile {row['tile']:>5}: {row['tiles']:3d} tiles, {row['seconds_median'] * 1000:9.1f} ms, "
              f"{row['megapixels_per_s']:.3f} MP/s", flush=True)
    timed = [row for row in rows if "error" not in row]
    whole = next((row for row in timed if row["tile"] == "whole"), None)
    for row in timed:
        row["overhead_vs_whole"] = row["seconds_median"] / whole["seconds_median"] - 1 if whole else None
    tiled = [row for row in timed if row["tile"] != "whole"]
    best = max(tiled, key=lambda row: row["megapixels_per_s"])["tile"] if tiled else None
    device = torch.device(args.device)
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU, {torch.get_num_threads()} threads")
    print(f"\n{args.config} on {hardware}, {args.size}, {args.precision}, batch {args.batch}: best tile {best}")
    print("| tile | tiles | ms | MP/s | overhead vs whole |\n|---|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['tile']} | {row['tiles']} | {row['error']} | | |")
        else:
            overhead = f"{row['overhead_vs_whole']:+.1%}" if row["overhead_vs_whole"] is not None else ""
            print(f"| {row['tile']} | {row['tiles']} | {row['seconds_median'] * 1000:.1f} | "
                  f"{row['megapixels_per_s']:.3f} | {overhead} |")
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "config": args.config, "size": args.size,
                                         "precision": args.precision, "batch": args.batch,
                                         "best_tile": best, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
