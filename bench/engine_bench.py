"""Engine throughput and peak memory, tiled against whole-image, plus the tiling's cost in quality.

Each case runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own.

    .venv/bin/python -m bench.engine_bench                     # bundled denoising weights
    .venv/bin/python -m bench.engine_bench --config deblurring --released   # released size, random weights
    .venv/bin/python -m bench.engine_bench --config deblurring --released --max-tiles 4

``--max-tiles`` runs only the first N tiles of the big image (then stitches what it has); the
megapixels per second it prints are for the tiles run, and the peak memory is the run's real
peak, which is what tiling bounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from service.tiling import Tiling

ROOT = Path(__file__).resolve().parents[1]
KODAK = ROOT.parent / "shared" / "datasets" / "eval" / "Kodak24"


def _engine(args):
    import torch

    from models import RELEASED_CONFIGS, load_model
    from models.weights import resolve
    from service.engine import Engine

    if args.released:
        torch.manual_seed(0)
        model = RELEASED_CONFIGS[args.config].build()
        label = f"released {args.config} configuration (random weights)"
    else:
        path = Path(args.weights) if args.weights else resolve(args.config)
        model = load_model(path)
        label = f"{path.name}"
    return Engine(model, device=args.device, tile_size=args.tile), label


def _case(args) -> dict:
    """Runs inside the subprocess: restore one image, report speed and peak memory."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    engine, label = _engine(args)
    height, width = map(int, args.size.split("x"))
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    tiling = Tiling(args.tile, args.overlap)
    plan, tiles = tiling.cut(image)
    count = len(tiles) if args.max_tiles is None else min(args.max_tiles, len(tiles))
    engine.forward(tiles[:1, :, :8, :8])  # first-call setup out of the timing
    start = time.perf_counter()
    outputs = tiles.copy()
    for i in range(0, count, args.batch):
        outputs[i:i + args.batch] = engine.forward(tiles[i:min(i + args.batch, count)])
    tiling.stitch(plan, outputs)
    seconds = time.perf_counter() - start
    computed_pixels = count * plan.tile_height * plan.tile_width
    image_pixels = height * width * count / len(tiles)
    return {
        "model": label, "size": args.size, "tile": args.tile, "tiles": len(tiles), "tiles_run": count,
        "seconds": round(seconds, 2), "image_mpix_per_s": round(image_pixels / seconds / 1e6, 4),
        "computed_mpix_per_s": round(computed_pixels / seconds / 1e6, 4),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def _run_case(args, size: str, tile: int, max_tiles: int | None) -> dict:
    command = [sys.executable, "-m", "bench.engine_bench", "--_case", "--config", args.config, "--size", size,
               "--tile", str(tile), "--overlap", str(args.overlap), "--batch", str(args.batch),
               "--threads", str(args.threads), "--device", args.device]
    if args.weights:
        command += ["--weights", args.weights]
    if args.released:
        command.append("--released")
    if max_tiles is not None:
        command += ["--max-tiles", str(max_tiles)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"size": size, "tile": tile, "failed": last, "exit": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tiling_psnr(args) -> list[dict]:
    """Tiled against whole-image output on real photos: what tiling costs in quality."""
    import numpy as np
    from PIL import Image

    engine, label = _engine(args)
    rows = []
    for photo in sorted(KODAK.glob("*.png"))[:args.photos]:
        image = np.asarray(Image.open(photo).convert("RGB"))
        whole = Tiling(0).restore(image, engine.forward).astype(float)
        for tile in (128, 256):
            tiled = Tiling(tile, args.overlap).restore(image, engine.forward).astype(float)
            mse = np.mean((whole - tiled) ** 2)
            rows.append({"photo": photo.name, "tile": tile, "overlap": args.overlap,
                         "psnr_vs_whole_db": round(float(10 * np.log10(255 ** 2 / mse)) if mse else float("inf"), 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="denoising",
                        help="task: its default weights, or with --released its released size")
    parser.add_argument("--weights", help="checkpoint to use instead of the task's default")
    parser.add_argument("--size", default="4000x3000", help="big image, HEIGHTxWIDTH (default 12 MP)")
    parser.add_argument("--whole-sizes", default="512x512,1024x1024", help="sizes for the whole-image path")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tiles", type=int)
    parser.add_argument("--photos", type=int, default=2, help="Kodak24 photos for the tiling-quality check")
    parser.add_argument("--released", action="store_true", help="use the released configuration of --config")
    parser.add_argument("--_case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._case:
        print(json.dumps(_case(args)))
        return

    report = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads", "cases": []}
    report["cases"].append(_run_case(args, args.size, args.tile, args.max_tiles))
    for size in filter(None, args.whole_sizes.split(",")):
        report["cases"].append(_run_case(args, size, 0, None))
    if not args.released and KODAK.is_dir():
        report["tiling_quality"] = _tiling_psnr(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
