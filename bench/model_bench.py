"""Model forward throughput against the hardware's limit, per configuration, precision and batch size.

For each released configuration (random weights: speed depends on the architecture, not on the
values) and the bundled one, this measures the forward pass alone (tiles already on the device,
stage 3 clamped, as ``Engine.forward`` runs it) in megapixels per second, counts the network's
FLOPs per pixel (``torch.utils.flop_counter`` on a small input; 2 FLOPs per multiply-add), and
sets achieved FLOP/s against the device's peak for that precision. fp16 and bf16 outputs are
compared with fp32's on the same tiles, as PSNR in dB over [0, 1].

    .venv/bin/python -m bench.model_bench --tile 64 --batch-sizes 1,2 --repeats 3      # CPU, small
    python -m bench.model_bench --device cuda --tile 512 --batch-sizes 1,4,16 --json out.json

Peak rates are the vendor's dense figures, leads rather than measured ceilings; fp32 convolutions
on CUDA run as TF32 on the tensor cores while ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's
default), so fp32's fraction is given against the TF32 peak then. ``fp32-no-tf32`` is fp32 with
TF32 off for matrix products and convolutions, the reference the half precisions are judged
against (speed and agreement): with TF32 on, "fp32" already runs on the tensor cores, and bf16's
peak is exactly twice TF32's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import RELEASED_CONFIGS, MPRNetConfig, load_model
from service.engine import Engine, is_out_of_memory

# The architecture MODEL_CARD.md gives for the bundled weights, used when no file is at hand.
BUNDLED_CONFIG = MPRNetConfig(n_feat=16, scale_unetfeats=12, scale_orsnetfeats=4, num_cab=2)

# Dense peak FLOP/s by GPU name fragment (first match wins): fp32 on the CUDA cores, tf32 and
# fp16/bf16 on the tensor cores. H200 has H100 SXM's compute with more memory.
PEAKS = (
    ("H100 PCIe", {"fp32": 51e12, "tf32": 378e12, "fp16": 756e12, "bf16": 756e12}),
    ("H100", {"fp32": 67e12, "tf32": 495e12, "fp16": 989e12, "bf16": 989e12}),
    ("H200", {"fp32": 67e12, "tf32": 495e12, "fp16": 989e12, "bf16": 989e12}),
    ("A100", {"fp32": 19.5e12, "tf32": 156e12, "fp16": 312e12, "bf16": 312e12}),
)


def flops_per_pixel(model: torch.nn.Module, side: int = 128) -> float:
    """FLOPs of one forward pass per input pixel, counted on a ``side`` x ``side`` tile on the CPU.

    Convolutions dominate and scale with the pixel count; the channel-attention pooling and the
    few pixel-independent terms are counted at this size and amortised, which is why the side is
    not tiny.
    """
    cpu_model = model.to("cpu")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        cpu_model(torch.rand(1, 3, side, side))
    return counter.get_total_flops() / (side * side)


# The precisions this benchmark knows: the engine's, and fp32 with TF32 off.
NO_TF32 = "fp32-no-tf32"


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matrix products and convolutions on or off inside the block; restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def peak_flops(device: torch.device, precision: str, stand_in: float | None = None) -> tuple[float | None, str]:
    """The device's peak for ``precision`` and which unit it is, or None where no table entry applies.

    ``stand_in`` is used where no table entry applies (a CPU), so that a dry run on a machine
    without a GPU still produces every line of a report; the unit then says so.
    """
    if device.type != "cuda":
        if stand_in:
            return stand_in, "stand-in (no GPU)"
        return None, "n/a (CPU: achieved rate only)"
    name = torch.cuda.get_device_name(device)
    unit = precision
    if precision == "fp32" and torch.backends.cudnn.allow_tf32:
        unit = "tf32"
    for fragment, peaks in PEAKS:
        if fragment in name:
            return peaks[unit], unit
    return None, f"unknown GPU {name!r}"


def _time_forward(engine: Engine, batch: torch.Tensor, repeats: int) -> list[float]:
    network = engine._fast_model
    with torch.inference_mode():
        for _ in range(2):  # cuDNN's autotuning and allocations out of the timing
            engine._run(network, batch)
        times = []
        for _ in range(repeats):
            if engine.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                engine._run(network, batch)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                started = time.perf_counter()
                engine._run(network, batch)
                times.append(time.perf_counter() - started)
    return times


def _psnr(output: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((output.astype(np.float64) - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _test_tiles(count: int, side: int, seed: int) -> np.ndarray:
    """Smooth structure plus mild noise: closer to photographs than uniform noise, which would
    sit on the clamp and flatter the agreement."""
    y, x = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        phase = rng.random(3) * 6
        base = np.stack([0.5 + 0.4 * np.sin(6 * x + phase[0]) * np.cos(5 * y + phase[1]),
                         0.5 + 0.4 * np.sin(4 * (x + y) + phase[2]),
                         0.5 + 0.3 * np.cos(7 * x - 3 * y)])
        tiles.append(np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1))
    return np.asarray(tiles, dtype=np.float32)


def _models(names: list[str]):
    for name in names:
        if name == "bundled":
            from models.weights import bundled_path
            found = [bundled_path(task) for task in ("deblurring", "denoising", "deraining")
                     if bundled_path(task).is_file()]
            if found:
                yield f"bundled ({found[0].name})", load_model(found[0])
            else:
                torch.manual_seed(0)
                yield "bundled (MODEL_CARD config, random weights)", BUNDLED_CONFIG.build()
        else:
            torch.manual_seed(0)
            yield f"released {name} (random weights)", RELEASED_CONFIGS[name].build()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", default=",".join([*RELEASED_CONFIGS, "bundled"]),
                        help="comma-separated: released configuration names and/or bundled")
    parser.add_argument("--precisions", default=f"{NO_TF32},fp32,fp16,bf16",
                        help=f"fp32, {NO_TF32} (fp32 with TF32 off), fp16, bf16; fp16 is skipped off CUDA")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels (multiple of 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per case; the median is reported")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC layout, the engine's default (--no-channels-last: NCHW)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stand-in-peak", type=float, metavar="FLOPS",
                        help="peak FLOP/s to report fractions against where the device has none (dry runs)")
    parser.add_argument("--allow-emulated-precision", action="store_true",
                        help="run bf16 on a CPU that would emulate it (dry runs: slow, but every row is made)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    precisions = [p for p in dict.fromkeys(args.precisions.split(",")) if p != "fp16" or device.type == "cuda"]
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                     f"{os.cpu_count()} cores")
    rows = []

    def save() -> None:
        # Rewritten after each configuration, so that a run stopped at a time limit keeps its rows.
        if args.json:
            args.json.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "tile": args.tile,
                                             "compile": args.compile,
                                             "rows": rows}, indent=2))

    print(f"# model forward on {hardware}, {args.tile}x{args.tile} tiles, torch {torch.__version__}", flush=True)
    for label, model in _models(args.configs.split(",")):
        per_pixel = flops_per_pixel(model)
        print(f"\n{label}: {per_pixel / 1e6:.3f} MFLOP per pixel", flush=True)
        reference: dict[int, np.ndarray] = {}
        for precision in precisions:
            strict = precision == NO_TF32
            engine = Engine(model, device=device, precision="fp32" if strict else precision, tile_size=args.tile,
                            max_batch_size=max(batch_sizes), channels_last=args.channels_last,
                            compile=args.compile, cuda_graphs=False,  # the forward pass alone is timed
                            allow_emulated_precision=args.allow_emulated_precision)
            with tf32(False) if strict else contextlib.nullcontext():
                peak, unit = peak_flops(device, engine.precision, args.stand_in_peak)
            for batch_size in batch_sizes:
                tiles = _test_tiles(batch_size, args.tile, seed=batch_size)
                row = {"model": label, "flops_per_pixel": per_pixel, "precision": precision,
                       "batch_size": batch_size, "tile": args.tile, "channels_last": engine.channels_last,
                       "hardware": hardware, "peak_unit": unit}
                try:
                    batch = torch.from_numpy(tiles).to(device)
                    with tf32(False) if strict else contextlib.nullcontext():
                        times = _time_forward(engine, batch, args.repeats)
                        output = engine.forward(tiles)
                except Exception as error:  # an oversized case is a result, not the end
                    if not is_out_of_memory(error):
                        raise
                    rows.append({**row, "error": "out of memory"})
                    print(f"  {precision} batch {batch_size}: out of memory", flush=True)
                    torch.cuda.empty_cache()
                    continue
                median = statistics.median(times)
                pixels = batch_size * args.tile * args.tile
                achieved = per_pixel * pixels / median
                row.update(seconds_median=median, seconds_all=times, megapixels_per_s=pixels / median / 1e6,
                           achieved_flops=achieved, peak_flops=peak,
                           fraction_of_peak=achieved / peak if peak else None)
                # Agreement is judged against the strictest fp32 run there is.
                if precision == NO_TF32 or (precision == "fp32" and batch_size not in reference):
                    reference[batch_size] = output
                elif batch_size in reference:
                    row["psnr_vs_fp32_db"] = _psnr(output, reference[batch_size])
                rows.append(row)
                fraction = f", {row['fraction_of_peak']:.1%} of {unit} peak" if peak else ""
                agreement = f", {row['psnr_vs_fp32_db']:.1f} dB vs fp32" if "psnr_vs_fp32_db" in row else ""
                print(f"  {precision} batch {batch_size:>3}: {row['megapixels_per_s']:8.3f} MP/s, "
                      f"{achieved / 1e9:9.1f} GFLOP/s{fraction}{agreement} (median of {len(times)})", flush=True)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
    print("\n| model | MFLOP/px | precision | batch | MP/s | GFLOP/s | of peak | PSNR vs fp32 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['flops_per_pixel'] / 1e6:.3f} | {row['precision']} | {row['batch_size']} "
                  f"| {row['error']} | | | |")
            continue
        fraction = f"{row['fraction_of_peak']:.1%}" if row["fraction_of_peak"] else "n/a"
        psnr = f"{row['psnr_vs_fp32_db']:.1f} dB" if "psnr_vs_fp32_db" in row else ""
        print(f"| {row['model']} | {row['flops_per_pixel'] / 1e6:.3f} | {row['precision']} | {row['batch_size']} "
              f"| {row['megapixels_per_s']:.3f} | {row['achieved_flops'] / 1e9:.1f} | {fraction} | {psnr} |")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
