"""Evaluate the bundled weights on Kodak24 and regenerate the model card's table.

    python -m training.evaluate --write-card          # all tasks, the bundled weights
    python -m training.evaluate --cbm3d-only          # fill the CBM3D cache (slow; resumable)
    python -m training.evaluate --weights denoising=runs/denoising/last.pt --tasks denoising

Every degraded image comes from a fixed seed per (setting, image), drawn from a seed sequence
that training never uses, so the numbers are reproducible and the photos and their degradations
are both unseen in training. Restoration goes through :class:`service.engine.Engine` untiled
(reflect-pad bottom/right to a multiple of 8, forward, crop), as the service runs it.

CBM3D (the ``bm3d`` package, ``pip install .[eval]``) takes minutes per image on this kind of
CPU, so its scores are cached in ``runs/eval/cbm3d.json`` and compared on the images cached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from models import MPRNetConfig, load_checkpoint
from models.weights import TASKS, bundled_path
from service.engine import Engine
from service.tiling import Tiling

from .card import CARD, replace_section
from .degradations import add_noise, add_rain, blur, disc_kernel, gaussian_kernel, motion_kernel, shake_kernel

# The card's numbers are of whole images: the network's own quality, without tiling's seams.
WHOLE_IMAGES = Tiling(tile_size=0)

ROOT = Path(__file__).resolve().parents[1]
KODAK = ROOT.parent / "shared" / "datasets" / "eval" / "Kodak24"
CBM3D_CACHE = ROOT / "runs" / "eval" / "cbm3d.json"
EVAL_ENTROPY = 20211126  # root of the evaluation seeds; training draws from seed 0 and 1_000_003+


def _pil_filter(filter_: ImageFilter.Filter) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: np.asarray(Image.fromarray(image).filter(filter_))


# Cheap classic restorations, run on the same degraded images, so the gains above have a floor to
# be read against: what a photo editor's one-click filter does to the same input.
UNSHARP = ("unsharp mask (PIL defaults: radius 2, 150 %, threshold 3)", _pil_filter(ImageFilter.UnsharpMask()))
MEDIAN = ("median filter, 5x5", _pil_filter(ImageFilter.MedianFilter(5)))


@dataclass(frozen=True)
class Setting:
    key: str
    task: str
    label: str
    degrade: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    classic: tuple[str, Callable[[np.ndarray], np.ndarray]] | None = None


SETTINGS = (
    Setting("noise15", "denoising", "Gaussian noise, sigma 15", lambda im, rng: add_noise(im, rng, sigma=15)),
    Setting("noise25", "denoising", "Gaussian noise, sigma 25", lambda im, rng: add_noise(im, rng, sigma=25)),
    Setting("noise50", "denoising", "Gaussian noise, sigma 50", lambda im, rng: add_noise(im, rng, sigma=50)),
    Setting("shake", "deblurring", "camera-shake trajectories (up to 27 px) + sensor noise",
            # Extent uniform in [3, 27] px, drawn exactly as the first evaluation drew it, so the
            # table stays comparable across changes to the training distribution.
            lambda im, rng: blur(im, rng, kernel=shake_kernel(rng, extent=rng.uniform(3.0, 27.0))), UNSHARP),
    Setting("rain", "deraining", "synthetic rain streaks (1-3 layers)", add_rain, MEDIAN),
    # Appended, not inserted: a setting's seeds follow its position in this tuple.
    Setting("mild_shake", "deblurring", "mild camera shake (3-9 px) + sensor noise",
            lambda im, rng: blur(im, rng, kernel=shake_kernel(rng, extent=rng.uniform(3.0, 9.0))), UNSHARP),
    # The other blurs of the training mixture, at sizes a photo commonly has: how the deblurring
    # weights do beyond camera shake, which is what held-out checks may bring.
    Setting("linear_motion", "deblurring", "linear motion (5-25 px, any angle) + sensor noise",
            lambda im, rng: blur(im, rng, kernel=motion_kernel(rng, length=rng.uniform(5.0, 25.0))), UNSHARP),
    Setting("defocus", "deblurring", "defocus disc (radius 2-6 px) + sensor noise",
            lambda im, rng: blur(im, rng, kernel=disc_kernel(rng, radius=rng.uniform(2.0, 6.0))), UNSHARP),
    Setting("gaussian_blur", "deblurring", "Gaussian blur (sigma 1-3 px) + sensor noise",
            lambda im, rng: blur(im, rng, kernel=gaussian_kernel(rng, sigma=(rng.uniform(1.0, 3.0),) * 2)),
            UNSHARP),
)


def degraded(setting: Setting, index: int, image: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([EVAL_ENTROPY, SETTINGS.index(setting), index])
    return setting.degrade(image, rng)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    taps = torch.exp(-0.5 * ((torch.arange(size, dtype=torch.float64) - size // 2) / sigma) ** 2)
    return taps / taps.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) on 8-bit RGB: 11x11 Gaussian window (sigma 1.5), constants
    K1 = 0.01 and K2 = 0.03, valid region only, averaged over the three channels; the usual
    definition (``skimage`` with ``gaussian_weights=True``, ``use_sample_covariance=False``)."""
    x = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[:, None]
    y = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[:, None]
    taps = _gaussian_window()
    window_h, window_v = taps.view(1, 1, 1, -1), taps.view(1, 1, -1, 1)
    def filt(t):
        return F.conv2d(F.conv2d(t, window_h), window_v)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x ** 2
    var_y = filt(y * y) - mu_y ** 2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def load_kodak(folder: Path, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".bmp", ".tif"})
    if not paths:
        raise SystemExit(f"no images in {folder}")
    return [(p.stem, np.asarray(Image.open(p).convert("RGB"))) for p in paths[:limit]]


def time_per_512(engine, repeats: int = 3) -> float:
    """Median seconds to restore one 512x512 photo (uint8 in, uint8 out) through the engine."""
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    WHOLE_IMAGES.restore(image, engine.forward)  # first call pays for allocator and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        WHOLE_IMAGES.restore(image, engine.forward)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# The configurations compared when choosing the bundled one (see the model card).
ARCHITECTURES = (
    dict(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=4),
    dict(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=3),
    dict(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=2),
    dict(n_feat=16, scale_unetfeats=12, scale_orsnetfeats=4, num_cab=2),
    dict(n_feat=20, scale_unetfeats=10, scale_orsnetfeats=4, num_cab=2),
    dict(n_feat=12, scale_unetfeats=12, scale_orsnetfeats=8, num_cab=4),
    # Larger ones that fit once the engine ran channels-last on the CPU (session 4).
    dict(n_feat=16, scale_unetfeats=12, scale_orsnetfeats=4, num_cab=4),
    dict(n_feat=24, scale_unetfeats=12, scale_orsnetfeats=4, num_cab=2),
    dict(n_feat=20, scale_unetfeats=12, scale_orsnetfeats=8, num_cab=3),
    dict(n_feat=32, scale_unetfeats=16, scale_orsnetfeats=8, num_cab=2),
)


def architecture_table() -> str:
    """Parameters and CPU time per 512x512 of each candidate configuration (random weights)."""
    lines = ["| n_feat | scale_unetfeats | scale_orsnetfeats | num_cab | parameters | CPU s / 512x512 |",
             "|---|---|---|---|---|---|"]
    for keywords in ARCHITECTURES:
        torch.manual_seed(0)
        engine = Engine(MPRNetConfig(**keywords).build(), device="cpu", tile_size=0)
        seconds = time_per_512(engine)
        lines.append(f"| {keywords['n_feat']} | {keywords['scale_unetfeats']} | {keywords['scale_orsnetfeats']} | "
                     f"{keywords['num_cab']} | {engine.parameter_count:,} | {seconds:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def evaluate_task(task: str, weights: Path, images, log) -> dict:
    checkpoint = load_checkpoint(weights)
    engine = Engine(checkpoint.model, config=checkpoint.config, device="cpu", tile_size=0)
    result = {"weights": str(weights), "config": checkpoint.config.as_kwargs(), "settings": {}}
    for setting in (s for s in SETTINGS if s.task == task):
        rows = []
        for index, (name, clean) in enumerate(images):
            noisy = degraded(setting, index, clean)
            restored = WHOLE_IMAGES.restore(noisy, engine.forward)
            row = {"image": name, "input_psnr": psnr(noisy, clean), "input_ssim": ssim(noisy, clean),
                   "psnr": psnr(restored, clean), "ssim": ssim(restored, clean)}
            if setting.classic:
                classic = setting.classic[1](noisy)
                row.update(classic_psnr=psnr(classic, clean), classic_ssim=ssim(classic, clean))
            rows.append(row)
        result["settings"][setting.key] = rows
        mean = {k: np.mean([r[k] for r in rows]) for k in ("input_psnr", "psnr")}
        log(f"{task} {setting.key}: input {mean['input_psnr']:.2f} dB -> {mean['psnr']:.2f} dB ({len(rows)} images)")
    result["seconds_per_512"] = time_per_512(engine)
    log(f"{task}: {result['seconds_per_512']:.2f} s per 512x512 with {torch.get_num_threads()} threads")
    return result


def run_cbm3d(images, log, sigma: int = 25) -> dict:
    """CBM3D with the true sigma on the same noisy images as the sigma-25 setting; cached per image."""
    import bm3d
    setting = next(s for s in SETTINGS if s.key == f"noise{sigma}")
    cache = json.loads(CBM3D_CACHE.read_text()) if CBM3D_CACHE.is_file() else {}
    for index, (name, clean) in enumerate(images):
        key = f"{name}|{setting.key}|{EVAL_ENTROPY}"
        if key in cache:
            continue
        noisy = degraded(setting, index, clean)
        start = time.perf_counter()
        estimate = bm3d.bm3d_rgb(noisy.astype(np.float64) / 255.0, sigma / 255.0)
        out = np.rint(np.clip(estimate, 0, 1) * 255).astype(np.uint8)
        cache[key] = {"image": name, "psnr": psnr(out, clean), "ssim": ssim(out, clean),
                      "seconds": time.perf_counter() - start}
        CBM3D_CACHE.parent.mkdir(parents=True, exist_ok=True)
        CBM3D_CACHE.write_text(json.dumps(cache, indent=1))
        log(f"CBM3D {name}: {cache[key]['psnr']:.2f} dB in {cache[key]['seconds']:.0f} s")
    return cache


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

def _mean(rows, key, names=None) -> float:
    return float(np.mean([r[key] for r in rows if names is None or r["image"] in names]))


def _by_task() -> list[Setting]:
    """Settings grouped by task, in order of each task's first setting."""
    first_of_task = [setting.task for setting in SETTINGS].index
    return sorted(SETTINGS, key=lambda setting: first_of_task(setting.task))


def table(results: dict, cbm3d: dict, n_images: int, threads: int) -> str:
    lines = [f"Kodak24 ({n_images} photos, 500x500), mean over photos; PSNR in dB on 8-bit RGB; SSIM on RGB "
             f"(11x11 Gaussian window). CPU time: one 512x512 photo through the engine, fp32, channels-last, "
             f"{threads} threads, median of 3.",
             "",
             "| Task | Degradation | Input PSNR / SSIM | MPRNet (ours) PSNR / SSIM | Gain | CPU s / 512x512 |",
             "|---|---|---|---|---|---|"]
    for setting in _by_task():
        result = results.get(setting.task)
        if result is None or setting.key not in result["settings"]:
            continue
        rows = result["settings"][setting.key]
        gain = _mean(rows, "psnr") - _mean(rows, "input_psnr")
        lines.append(f"| {setting.task} | {setting.label} | {_mean(rows, 'input_psnr'):.2f} / "
                     f"{_mean(rows, 'input_ssim'):.3f} | {_mean(rows, 'psnr'):.2f} / {_mean(rows, 'ssim'):.3f} | "
                     f"{gain:+.2f} dB | {result['seconds_per_512']:.2f} |")
    classic_lines = []
    for setting in (s for s in _by_task() if s.classic):
        result = results.get(setting.task)
        if result is None or setting.key not in result["settings"]:
            continue
        rows = result["settings"][setting.key]
        classic_lines.append(f"| {setting.label} | {setting.classic[0]} | {_mean(rows, 'classic_psnr'):.2f} / "
                             f"{_mean(rows, 'classic_ssim'):.3f} | "
                             f"{_mean(rows, 'classic_psnr') - _mean(rows, 'input_psnr'):+.2f} dB | "
                             f"{_mean(rows, 'psnr') - _mean(rows, 'input_psnr'):+.2f} dB |")
    if classic_lines:
        lines += ["", "Classic filters on the same degraded images:", "",
                  "| Degradation | Classic filter | PSNR / SSIM | Gain | MPRNet (ours) gain |",
                  "|---|---|---|---|---|", *classic_lines]
    denoising = results.get("denoising")
    entries = [v for k, v in cbm3d.items() if k.endswith(f"|noise25|{EVAL_ENTROPY}")]
    if denoising and entries and "noise25" in denoising["settings"]:
        names = {e["image"] for e in entries}
        rows = denoising["settings"]["noise25"]
        cbm3d_seconds = np.mean([e["seconds"] for e in entries])
        lines += ["",
                  f"Baseline, Gaussian sigma 25, on the same noisy images ({len(names)} of the photos"
                  f"{'' if len(names) >= n_images else ': ' + ', '.join(sorted(names))}):",
                  "",
                  "| Method | PSNR | SSIM | CPU s / image |",
                  "|---|---|---|---|",
                  f"| noisy input | {_mean(rows, 'input_psnr', names):.2f} | "
                  f"{_mean(rows, 'input_ssim', names):.3f} | |",
                  f"| CBM3D (`bm3d.bm3d_rgb`, true sigma) | {np.mean([e['psnr'] for e in entries]):.2f} | "
                  f"{np.mean([e['ssim'] for e in entries]):.3f} | {cbm3d_seconds:.0f} |",
                  f"| MPRNet (ours, blind) | {_mean(rows, 'psnr', names):.2f} | {_mean(rows, 'ssim', names):.3f} | "
                  f"{denoising['seconds_per_512']:.2f} |"]
    return "\n".join(lines)


def write_card(text: str, card: Path = CARD) -> None:
    replace_section("eval-table", text, card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=KODAK, help="folder of clean evaluation photos")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--weights", action="append", default=[], metavar="TASK=PATH",
                        help="evaluate this checkpoint (any format, a run's last.pt too) instead of the bundled one")
    parser.add_argument("--limit", type=int, help="only the first N photos")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cbm3d-only", action="store_true", help="only fill the CBM3D cache")
    parser.add_argument("--architectures", action="store_true",
                        help="only time the candidate configurations (random weights) and print their table")
    parser.add_argument("--json", type=Path, help="also write all per-image numbers here")
    parser.add_argument("--write-card", action="store_true", help=f"replace the table in {CARD.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.architectures:
        print(architecture_table())
        return 0
    images = load_kodak(args.data, args.limit)
    if args.cbm3d_only:
        run_cbm3d(images, log)
        return 0
    overrides = dict(item.split("=", 1) for item in args.weights)
    results = {task: evaluate_task(task, Path(overrides.get(task, bundled_path(task))), images, log)
               for task in args.tasks}
    cbm3d = json.loads(CBM3D_CACHE.read_text()) if CBM3D_CACHE.is_file() else {}
    text = table(results, cbm3d, len(images), args.threads)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.write_card:
        write_card(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
