"""Train MPRNet for one restoration task on a folder of clean photos.

Degraded inputs are synthesised on the fly (:mod:`training.degradations`), so any folder of clean
photos (CBSD432, DIV2K, your own) is a training set::

    python -m training.train --task denoising --data ../shared/datasets/train/CBSD432 --out runs/denoising \\
        --minutes 30 --patch 96 --batch 8

The loss is the paper's: Charbonnier (eps 1e-3) plus 0.05 x Charbonnier between Laplacian edge
maps, summed over the three stage outputs; deblurring and deraining add an L1 distance between
spectra (:data:`SPECTRAL_WEIGHT`). Adam with a short linear warm-up then cosine decay;
the schedule runs over ``--iters`` iterations or, with ``--minutes``, over wall-clock time, so a
time-budgeted run still ends at the bottom of its schedule.

``RUNDIR/last.pt`` (model, optimiser, schedule, iteration, RNG states; plain tensors and
primitives, readable with ``torch.load(weights_only=True)``) is rewritten atomically every few
minutes and on SIGINT/SIGTERM; ``--resume`` continues from it. ``--init FILE`` starts from
existing weights (e.g. the bundled ``models/weights/<task>.safetensors``) with a fresh optimiser;
architecture flags beside it grow those weights into that wider or deeper network, which starts
out computing exactly what they compute (:mod:`training.widen`).
``--export FILE`` writes a run's weights as safetensors and exits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import signal
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import MPRNet, MPRNetConfig, infer_config, load_state_dict, save_safetensors, sha256_file
from models.checkpoint import ATTENTION_PATCH_NOTE, MAX_ATTENTION_PATCH, CheckpointError, attention_patch, read_notes
from service.devices import emulated_precision_problem
from service.image_files import IMAGE_SUFFIXES
from service.imaging import ImageError, read_image

from .degradations import MAX_KERNEL, MIXTURES
from .widen import widen

# Blur kernels and rain streaks reach this far; degrading a larger crop and cutting the border
# off means the patch's edges see real neighbours, not reflected ones.
MARGIN = MAX_KERNEL // 2 + 1
VAL_SEED = 1_000_003  # degradation seeds of the validation crops; distinct from any training seed
VAL_HOLDOUT = 8       # images kept out of training when no --val folder is given
VAL_CROP = 192
# Rain falls: the mixtures draw streaks within 40 degrees of vertical, and patches turned a
# quarter made them horizontal too, which taught the derainer to erase the scene's horizontal
# lines (louvres, blinds, railings: a clean Kodak24 photo of shutters came out at 23.4 dB).
# Deraining patches are only mirrored and half-turned; noise and blur have no direction, so
# their patches take any quarter turn.
UPRIGHT_TASKS = frozenset({"deraining"})


def _batch_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


class EdgeLoss(torch.nn.Module):
    """Charbonnier distance between Laplacian edge maps, as in the paper.

    The Laplacian is a difference of Gaussians: the image minus its Gaussian-filtered,
    down- and up-sampled self (one level of a Laplacian pyramid), which keeps edges and drops
    flat regions.
    """

    def __init__(self, channels: int = 3):
        super().__init__()
        taps = torch.tensor([0.05, 0.25, 0.4, 0.25, 0.05])
        self.register_buffer("kernel", torch.outer(taps, taps).expand(channels, 1, 5, 5).contiguous())

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), self.kernel, groups=x.shape[1])

    def laplacian(self, x: torch.Tensor) -> torch.Tensor:
        low = self._blur(x)[..., ::2, ::2]
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = low
        mask = torch.zeros_like(x[:1])
        mask[..., ::2, ::2] = 1
        # Dividing by the blurred sampling mask interpolates the zero-inserted samples; unlike a
        # fixed gain of 4 it stays exact at the borders, so flat patches have no edges there.
        return x - self._blur(up) / self._blur(mask)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return charbonnier(self.laplacian(x), self.laplacian(y))


def spectral_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the two images' 2-D spectra (real and imaginary parts).

    Orthonormal, so a coefficient's error is on a pixel error's scale (Parseval) and the weight
    compares with the pixel loss's whatever the patch size.
    """
    return torch.view_as_real(torch.fft.rfft2(x - y, norm="ortho")).abs().mean()


# Weight of spectral_distance beside the pixel loss, per task. A pixel loss lets a deblurrer stay
# soft: the fine detail it should restore is a small share of any patch's pixel error but most of
# the spectrum's coefficients, each of which an L1 spectral distance counts alike. In the
# twenty-first session's paired CPU runs (1,330 steps from the bundled deblurrer, same seed and
# patches) it beat the paper's loss by 0.02-0.10 dB on every blur row but camera roll (-0.01) and
# by 1.2-1.3 dB on clean photos (Kodak24, 8 and 24 photos; model card). Rain streaks are thin, so
# most of what a derainer leaves or smudges is fine detail too: the twenty-second session's pair
# (1,160 steps from the bundled derainer) beat the paper's loss on 7 of 9 rain rows (by up to
# 0.18 dB; gusty rain -0.08 and -0.13) and on clean photos by 2.4 dB, on 8 and 24 photos.
# Denoising was not tried with it and keeps the paper's loss.
SPECTRAL_WEIGHT = {"deblurring": 1.0, "deraining": 1.0}


class MPRNetLoss(torch.nn.Module):
    def __init__(self, edge_weight: float = 0.05, spectral_weight: float = 0.0):
        super().__init__()
        self.edge = EdgeLoss()
        self.edge_weight = edge_weight
        self.spectral_weight = spectral_weight

    def forward(self, outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        total = sum(charbonnier(o, target) + self.edge_weight * self.edge(o, target) for o in outputs)
        if self.spectral_weight:
            total = total + self.spectral_weight * sum(spectral_distance(o, target) for o in outputs)
        return total


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def list_images(folder: str | os.PathLike) -> list[Path]:
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths


def read_photo(path: Path) -> np.ndarray:
    """A photo's pixels as the service decodes an upload of it (EXIF orientation applied, 16-bit grey
    scaled to 8 bits, not clipped to white), so training and evaluation see what serving restores."""
    try:
        return read_image(path).rgb
    except (ImageError, OSError) as error:
        raise SystemExit(f"{path}: cannot be read as a photo: {error}") from None


def load_images(paths: list[Path]) -> list[np.ndarray]:
    """Decode once; cropping decoded arrays is far cheaper than decoding a JPEG per patch."""
    return [read_photo(p) for p in paths]


class PatchSampler:
    """Random degraded/clean patch pairs, mirrored and turned (see :data:`UPRIGHT_TASKS`).

    Everything random comes from one numpy Generator, whose state goes into the checkpoint, so
    a resumed run sees the same stream of patches it would have seen without the interruption.
    """

    def __init__(self, images: list[np.ndarray], task: str, patch: int, rng: np.random.Generator,
                 mixture: str = "broad"):
        self.images = [im for im in images if min(im.shape[:2]) >= patch]
        if not self.images:
            raise SystemExit(f"no training image is at least {patch}x{patch}")
        self.task, self.patch, self.rng, self.mixture = task, patch, rng, mixture
        self.degrade = MIXTURES[mixture][task]

    def _pair(self) -> tuple[np.ndarray, np.ndarray]:
        rng, p = self.rng, self.patch
        image = self.images[rng.integers(len(self.images))]
        h, w = image.shape[:2]
        top, left = rng.integers(0, h - p + 1), rng.integers(0, w - p + 1)
        # Context around the patch where the image has it; the patch itself is always inside.
        t0, l0 = max(top - MARGIN, 0), max(left - MARGIN, 0)
        context = image[t0:min(top + p + MARGIN, h), l0:min(left + p + MARGIN, w)]
        degraded = self.degrade(context, rng)
        clean = context[top - t0:top - t0 + p, left - l0:left - l0 + p]
        degraded = degraded[top - t0:top - t0 + p, left - l0:left - l0 + p]
        k = int(rng.integers(4))
        if self.task in UPRIGHT_TASKS:
            k &= 2  # no turn or a half turn, from the same draw: other tasks' streams are unchanged
        flip = bool(rng.integers(2))
        pair = []
        for array in (clean, degraded):
            array = np.rot90(array, k)
            pair.append(array[:, ::-1] if flip else array)
        return pair[0], pair[1]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._pair() for _ in range(size)]
        clean = np.stack([c for c, _ in pairs])
        degraded = np.stack([d for _, d in pairs])
        return _batch_tensor(clean), _batch_tensor(degraded)


class _PatchStream(torch.utils.data.IterableDataset):
    """Endless batches from a :class:`PatchSampler` in each DataLoader worker.

    A GPU consumes patches faster than one CPU core degrades them. Each worker draws from its own
    Generator seeded by (seed, iteration the run started or resumed at, worker), so a run is
    reproducible for a given seed and resume point, but unlike the single-process sampler a
    resumed run does not continue the exact stream it was interrupted in.
    """

    def __init__(self, images: list[np.ndarray], task: str, patch: int, batch: int, seed: int, start: int,
                 mixture: str = "broad"):
        self.images, self.task, self.patch, self.batch, self.seed, self.start = images, task, patch, batch, seed, start
        self.mixture = mixture

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.start, worker.id if worker else 0])
        sampler = PatchSampler(self.images, self.task, self.patch, rng, self.mixture)
        while True:
            yield sampler.batch(self.batch)


def patch_batches(sampler: PatchSampler, batch: int, workers: int, seed: int, start: int, pin: bool):
    """Iterator of (clean, degraded) batches: from ``sampler`` itself, or from ``workers`` processes."""
    if not workers:
        while True:
            yield sampler.batch(batch)
    stream = _PatchStream(sampler.images, sampler.task, sampler.patch, batch, seed, start, sampler.mixture)
    yield from torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin,
                                           prefetch_factor=4, persistent_workers=True)


def validation_set(images: list[np.ndarray], task: str,
                   mixture: str = "broad") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Centre crops with fixed degradation seeds, so every validation of every run compares alike
    (within one mixture: the broad and classic mixtures degrade the crops differently)."""
    pairs = []
    for index, image in enumerate(images):
        h, w = image.shape[:2]
        size = min(VAL_CROP, h // 8 * 8, w // 8 * 8)
        top, left = (h - size) // 2, (w - size) // 2
        clean = image[top:top + size, left:left + size]
        degraded = MIXTURES[mixture][task](clean, np.random.default_rng(VAL_SEED + index))
        pairs.append((_batch_tensor(clean[None]), _batch_tensor(degraded[None])))
    return pairs


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = F.mse_loss(x.clamp(0, 1), y.clamp(0, 1)).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.inference_mode()
def validate(model: MPRNet, pairs, device: torch.device) -> tuple[float, float]:
    """Mean PSNR of the restored and of the degraded validation crops."""
    was_training = model.training
    model.eval()
    restored, degraded = [], []
    for clean, noisy in pairs:
        clean, noisy = clean.to(device), noisy.to(device)
        restored.append(psnr(model(noisy)[0], clean))
        degraded.append(psnr(noisy, clean))
    model.train(was_training)
    return float(np.mean(restored)), float(np.mean(degraded))


# ---------------------------------------------------------------------------------------------
# Schedule and checkpoints
# ---------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    """Linear warm-up then cosine decay to ``floor`` x the peak.

    Progress is the fraction of iterations done, or of seconds trained when the run has a time
    budget; whichever budget is given ends the run when progress reaches 1.
    """

    peak_lr: float
    warmup: int = 100
    iters: int = 0
    seconds: float = 0.0
    floor: float = 0.01
    iteration: int = 0
    elapsed: float = 0.0

    def progress(self) -> float:
        done = []
        if self.iters:
            done.append(self.iteration / self.iters)
        if self.seconds:
            done.append(self.elapsed / self.seconds)
        return min(max(done), 1.0) if done else 0.0

    def lr(self) -> float:
        if self.iteration < self.warmup:
            return self.peak_lr * (self.iteration + 1) / self.warmup
        cosine = 0.5 * (1 + math.cos(math.pi * self.progress()))
        return self.peak_lr * (self.floor + (1 - self.floor) * cosine)

    def finished(self) -> bool:
        return self.progress() >= 1.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for field in fields(self):
            setattr(self, field.name, state[field.name])


def _rng_state(rng: np.random.Generator) -> dict:
    # numpy's state holds 128-bit integers; strings survive weights_only loading unchanged.
    return {"numpy": json.dumps(rng.bit_generator.state), "torch": torch.get_rng_state()}


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = json.loads(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, model: MPRNet, config: MPRNetConfig, optimizer, schedule: Schedule, rng,
                    meta: dict) -> None:
    """Write to a temporary file and rename, so a kill mid-write never leaves a torn ``last.pt``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "iteration": schedule.iteration,
             "rng": _rng_state(rng), "config": config.as_kwargs(), "meta": meta}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


RUN_KEYS = frozenset({"model", "config", "schedule", "iteration"})


def read_run(path: str | os.PathLike) -> dict:
    """A training checkpoint (a run's ``last.pt``), or one line saying why it cannot be used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such training checkpoint") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as error:
        # torch's explanations run to several sentences; the first says what broke.
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else ""
        raise SystemExit(f"{path}: not a readable training checkpoint, torn or not a last.pt "
                         f"({type(error).__name__}: {reason})") from None
    if not isinstance(state, dict) or not RUN_KEYS <= state.keys():
        raise SystemExit(f"{path}: not a training run's last.pt (weights alone have no schedule to continue)")
    return state


def total_training(state: dict) -> tuple[int, float]:
    """(iterations, seconds) behind a training checkpoint's weights, earlier runs included."""
    meta = state.get("meta", {})
    return (int(state["iteration"]) + int(meta.get("prior_iterations", 0)),
            float(state["schedule"]["elapsed"]) + float(meta.get("prior_seconds", 0)))


def export(checkpoint: str | os.PathLike, path: str | os.PathLike, half: bool = False,
           average_with: tuple[str | os.PathLike, float] | None = None) -> str:
    """Write a training checkpoint's weights as safetensors; returns the file's sha256.

    ``average_with`` (weights file, share) mixes another network of the same architecture into
    the result, per tensor: ``(1 - share) * run + share * other``. Averaging a fine-tuned network
    with the one it started from trades what the fine-tuning gained against what it lost
    (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022, call it WiSE-FT).
    """
    state = read_run(checkpoint)
    config = MPRNetConfig(**state["config"])
    model = config.build()
    model.load_state_dict(state["model"])
    meta = state.get("meta", {})
    iterations, seconds = total_training(state)
    # The mixture tells the evaluation which of its rows these weights' training sampled; runs
    # from before issue 16 recorded none and trained on the classic one.
    metadata = {"config": json.dumps(config.as_kwargs()), "iteration": str(iterations),
                "task": str(meta.get("task", "")), "trained_seconds": f"{seconds:.0f}",
                "mixture": str(meta.get("mixture", "classic"))}
    if meta.get(ATTENTION_PATCH_NOTE):
        # The weights learnt with this pooling and need it at run time: models.checkpoint applies it.
        metadata[ATTENTION_PATCH_NOTE] = str(meta[ATTENTION_PATCH_NOTE])
    if average_with is not None:
        other_path, share = average_with
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the share of the other weights must be in [0, 1], got {share}")
        other = load_state_dict(other_path)
        if infer_config(other) != config:
            raise ValueError(f"{other_path} is a {infer_config(other).as_kwargs()} network, the run a "
                             f"{config.as_kwargs()} one: only the same architecture averages")
        mine = model.state_dict()
        model.load_state_dict({key: torch.lerp(value, other[key].to(value.dtype), share)
                               for key, value in mine.items()})
        metadata["averaged_with"] = json.dumps({"sha256": sha256_file(other_path), "share": share})
    return save_safetensors(model, path, half=half, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------

class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here; train with --device cpu")
    return device


def _log(handle, message: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    print(line, flush=True)
    handle.write(line + "\n")
    handle.flush()


def _lineage(args, resume_state: dict | None) -> dict:
    """Iterations and seconds of training already in the starting weights, so that fine-tuned
    weights report their whole training, not just the last run's."""
    recorded = (resume_state or {}).get("meta", {})
    if "prior_iterations" in recorded:
        return {"prior_iterations": recorded["prior_iterations"], "prior_seconds": recorded["prior_seconds"]}
    iterations, seconds = 0, 0.0
    if args.init and str(args.init).endswith(".safetensors"):
        metadata = read_notes(args.init)
        iterations, seconds = int(metadata.get("iteration", 0)), float(metadata.get("trained_seconds", 0))
    elif args.init:
        # A run's last.pt keeps its training in its schedule and meta, where no notes are.
        state = torch.load(args.init, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and RUN_KEYS <= state.keys():
            iterations, seconds = total_training(state)
    return {"prior_iterations": iterations, "prior_seconds": seconds}


# How a run's last.pt describes what it trains on. Resuming it with other values would continue
# its weights on other patches and write the new values into its meta, as if they had held all
# along (runs from before issue 16 recorded no mixture and trained on the classic one).
RECORDED_TRAINING = {"task": ("trains {}", None), "mixture": ("trains on the {} mixture", "classic"),
                     "patch": ("trains on {} px patches", None)}


def _refuse_relabelling(args, last: Path, meta: dict) -> None:
    for name, (description, absent) in RECORDED_TRAINING.items():
        recorded, given = meta.get(name, absent), getattr(args, name)
        if recorded is not None and recorded != given:
            raise SystemExit(f"{last} {description.format(recorded)}; --{name} {given} would relabel it "
                             f"(resume with --{name} {recorded}, or start a new run from it with --init {last})")


ARCHITECTURE_FLAGS = ("n_feat", "scale_unetfeats", "scale_orsnetfeats", "num_cab", "reduction")
DEFAULT_ARCHITECTURE = MPRNetConfig(n_feat=16, scale_unetfeats=12, scale_orsnetfeats=4, num_cab=2)


def build_model(args) -> tuple[MPRNet, MPRNetConfig]:
    requested = {name: getattr(args, name) for name in ARCHITECTURE_FLAGS if getattr(args, name) is not None}
    if not args.init:
        config = replace(DEFAULT_ARCHITECTURE, **requested)
        return config.build(), config
    try:
        state = load_state_dict(args.init)
        config = infer_config(state)
    except CheckpointError as error:
        raise SystemExit(f"--init {args.init}: {error}") from None
    target = replace(config, **requested)
    if target != config:
        try:
            state = widen(state, config, target, seed=args.seed)
        except ValueError as error:
            raise SystemExit(f"cannot start a {target.as_kwargs()} network from {args.init}: {error}") from None
        config = target
    model = config.build()
    model.load_state_dict(state)
    return model, config


def chosen_attention_patch(args, resume_state: dict | None) -> int | None:
    """The run's channel-attention pooling: a resumed run keeps its own; otherwise the flag (0:
    the whole input), else what the --init weights were trained with."""
    if resume_state is not None:
        return attention_patch(resume_state.get("meta", {}))
    if args.attention_patch is not None:
        return args.attention_patch or None
    return attention_patch(read_notes(args.init)) if args.init else None


def train(args) -> Path:
    """Run (or continue) one training run; returns the path of ``last.pt``."""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file is in the way" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
        raise SystemExit(f"--out {out}: cannot make the run folder there ({reason})") from None
    last = out / "last.pt"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    emulated = emulated_precision_problem("bf16", device) if args.bf16 else None
    if emulated and not args.allow_emulated_precision:
        # One thread of an AVX2-only Zen 1 took 52 s for a step on 8 patches of 128 px in bf16 and
        # 7.5-8.4 s in fp32 (twenty-third session): a run that silently does a sixth of its steps.
        raise SystemExit(f"--bf16: {emulated}; train in fp32 (leave out --bf16), or give "
                         "--allow-emulated-precision to run it anyway")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    resume_state = read_run(last) if args.resume and last.exists() else None
    if resume_state is not None:
        _refuse_relabelling(args, last, resume_state.get("meta", {}))

    paths = list_images(args.data)
    if args.val:
        val_paths = list_images(args.val)[:VAL_HOLDOUT]
    else:
        if len(paths) < 2:
            raise SystemExit("need at least two photos to hold one out for validation, or give --val")
        held_out = min(VAL_HOLDOUT, max(1, len(paths) // 4))
        val_paths, paths = paths[:held_out], paths[held_out:]
    sampler = PatchSampler(load_images(paths), args.task, args.patch, rng, args.mixture)
    val_images = load_images(val_paths)
    for path, image in zip(val_paths, val_images):
        if min(image.shape[:2]) < 8:
            raise SystemExit(f"{path} is {image.shape[1]}x{image.shape[0]}: validation crops need photos of at "
                             "least 8x8 (MPRNet runs on multiples of 8)")
    val_pairs = validation_set(val_images, args.task, args.mixture)

    if resume_state is not None:
        config = MPRNetConfig(**resume_state["config"])
        model = config.build()
        model.load_state_dict(resume_state["model"])
    else:
        model, config = build_model(args)
    patch = chosen_attention_patch(args, resume_state)
    if patch is not None and patch >= args.patch:
        # Every attention's window would hold its whole input: the paper's pooling, by another name.
        raise SystemExit(f"--attention-patch {patch} pools locally only on patches larger than it "
                         f"(--patch {args.patch})")
    model.pool_attention_locally(patch)
    # Channels-last lets oneDNN/cuDNN pick their fast convolution kernels (1.3x per training
    # step on this 2-core CPU for the bundled size).
    model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    schedule = Schedule(peak_lr=args.lr, warmup=args.warmup, iters=args.iters or 0,
                        seconds=(args.minutes or 0) * 60.0)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state["schedule"])
        # A resumed run may be given a longer or shorter budget than the first part had.
        schedule.iters = args.iters or 0
        schedule.seconds = (args.minutes or 0) * 60.0
        _set_rng_state(rng, resume_state["rng"])
    if not schedule.iters and not schedule.seconds:
        raise SystemExit("give --iters or --minutes (or both)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training shapes never change
    batches = patch_batches(sampler, args.batch, args.workers, args.seed, schedule.iteration,
                            pin=device.type == "cuda")
    spectral_weight = SPECTRAL_WEIGHT.get(args.task, 0.0)
    criterion = MPRNetLoss(spectral_weight=spectral_weight).to(device)
    meta = {"task": args.task, "mixture": args.mixture, "spectral_weight": spectral_weight, "patch": args.patch,
            ATTENTION_PATCH_NOTE: patch,
            "batch": args.batch, "seed": args.seed, "bf16": args.bf16,
            "data": str(args.data), "device": str(device), "threads": torch.get_num_threads(), "workers": args.workers,
            **_lineage(args, resume_state)}
    stop = _StopFlag()

    with open(out / "train.log", "a") as log:
        params = sum(p.numel() for p in model.parameters())
        _log(log, f"{'resume' if resume_state else 'start'} task={args.task} mixture={args.mixture} "
                  f"config={config.as_kwargs()} "
                  f"params={params} train_images={len(sampler.images)} val_images={len(val_pairs)} "
                  f"patch={args.patch} attention_patch={patch} batch={args.batch} lr={schedule.peak_lr} "
                  f"warmup={schedule.warmup} "
                  f"spectral_weight={spectral_weight} "
                  f"device={device} bf16={args.bf16} "
                  f"threads={torch.get_num_threads()} iteration={schedule.iteration} "
                  f"elapsed={schedule.elapsed:.0f}s")
        if (schedule.peak_lr, schedule.warmup) != (args.lr, args.warmup):
            _log(log, f"resumed with the run's own schedule (peak lr {schedule.peak_lr}, warm-up {schedule.warmup}): "
                      f"--lr {args.lr} and --warmup {args.warmup} apply to new runs only")
        last_save = last_val = time.monotonic()
        running, grad_norm, count = 0.0, 0.0, 0
        tick = time.monotonic()
        while not schedule.finished() and not stop.raised:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr()
            clean, degraded = next(batches)
            clean = clean.to(device, memory_format=torch.channels_last, non_blocking=True)
            degraded = degraded.to(device, memory_format=torch.channels_last, non_blocking=True)
            # bf16 autocast keeps fp32 master weights; the loss is taken in fp32.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                outputs = model(degraded)
            loss = criterion([output.float() for output in outputs], clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Tiny networks at a high learning rate occasionally spike; clipping keeps one bad
            # batch from undoing minutes of CPU training.
            # Summed on the device: reading a number back every step would stall a GPU.
            grad_norm += torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).detach()
            optimizer.step()
            now = time.monotonic()
            schedule.elapsed += now - tick
            tick = now
            schedule.iteration += 1
            running += loss.detach()
            count += 1
            if schedule.iteration % args.log_every == 0:
                _log(log, f"iter {schedule.iteration} loss {float(running) / count:.5f} "
                          f"grad_norm {float(grad_norm) / count:.3f} "
                          f"lr {schedule.lr():.2e} elapsed {schedule.elapsed:.0f}s progress {schedule.progress():.3f}")
                running, grad_norm, count = 0.0, 0.0, 0
            if now - last_val >= args.val_minutes * 60:
                restored, base = validate(model, val_pairs, device)
                _log(log, f"iter {schedule.iteration} val_psnr {restored:.2f} degraded_psnr {base:.2f}")
                last_val = tick = time.monotonic()  # validation time is not training time
            if now - last_save >= args.save_minutes * 60:
                save_checkpoint(last, model, config, optimizer, schedule, rng, meta)
                last_save = tick = time.monotonic()
        batches.close()  # stops the patch workers
        save_checkpoint(last, model, config, optimizer, schedule, rng, meta)
        restored, base = validate(model, val_pairs, device)
        reason = "stopped by signal" if stop.raised else "finished"
        _log(log, f"{reason} iter {schedule.iteration} elapsed {schedule.elapsed:.0f}s "
                  f"val_psnr {restored:.2f} degraded_psnr {base:.2f}")
    return last


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", choices=sorted(MIXTURES["broad"]), help="what to learn to undo")
    parser.add_argument("--mixture", choices=sorted(MIXTURES), default="broad",
                        help="degradations to train on: broad (camera-pipeline noise, several rain and blur "
                             "families; issue 16), classic (what the bundled weights were first trained on) or "
                             "randomized (broad, with randomized rain for deraining; not what any bundled weights saw)")
    parser.add_argument("--data", help="folder of clean training photos")
    parser.add_argument("--val", help=f"folder of clean validation photos (first {VAL_HOLDOUT} used); "
                                      f"default: hold out the first {VAL_HOLDOUT} (at most a quarter) of --data")
    parser.add_argument("--out", required=True, help="run folder: train.log and last.pt go here")
    parser.add_argument("--iters", type=int, help="iterations to train for (total, across resumes)")
    parser.add_argument("--minutes", type=float, help="training time budget (total, across resumes)")
    parser.add_argument("--patch", type=int, default=64, help="patch side; a multiple of 8")
    parser.add_argument("--attention-patch", type=int, metavar="N",
                        help="channel attention pools over the regions an NxN crop gives each layer, half and "
                             "half with its whole input (MPRNet.pool_attention_locally; below --patch); 0: the "
                             "whole input, as the paper; default: what the --init weights say, else 0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate; a resumed run keeps its own")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up iterations; a resumed run keeps its own")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda:N)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast (fp32 weights): 1.4x faster steps on CPUs with AVX512-BF16, 2.1x "
                             "with AMX, and faster on recent GPUs; refused where the device only emulates it")
    parser.add_argument("--allow-emulated-precision", action="store_true",
                        help="run --bf16 on a device without bf16 instructions (an AVX2-only CPU: 6x slower steps)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes degrading patches in parallel (for a GPU); 0 = in the training loop")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    parser.add_argument("--init", help="start from these weights (.safetensors or .pth); sets the architecture")
    parser.add_argument("--export", metavar="FILE", help="write OUT/last.pt's weights to FILE (safetensors) and exit")
    parser.add_argument("--half", action="store_true", help="with --export: store fp16")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--val-minutes", type=float, default=5.0, help="minutes between validations")
    parser.add_argument("--save-minutes", type=float, default=3.0, help="minutes between saves of OUT/last.pt")
    arch = parser.add_argument_group(
        "architecture", f"default {DEFAULT_ARCHITECTURE.n_feat}/{DEFAULT_ARCHITECTURE.scale_unetfeats}/"
                        f"{DEFAULT_ARCHITECTURE.scale_orsnetfeats}/{DEFAULT_ARCHITECTURE.num_cab}, reduction "
                        f"{DEFAULT_ARCHITECTURE.reduction}; with --init, the file's, and flags given grow its "
                        "weights to that size; ignored with --resume")
    for name in ARCHITECTURE_FLAGS:
        arch.add_argument("--" + name.replace("_", "-"), type=int)
    args = parser.parse_args(argv)
    if args.export:
        if not (Path(args.out) / "last.pt").is_file():
            parser.error(f"--export: no run to export, {Path(args.out) / 'last.pt'} does not exist")
        return args
    if not (args.task and args.data):
        parser.error("--task and --data are required to train")
    for flag, folder in (("--data", args.data), ("--val", args.val)):
        if folder and not Path(folder).is_dir():
            parser.error(f"{flag} {folder}: {'not a folder' if Path(folder).exists() else 'no such folder'}")
    if args.init and not Path(args.init).is_file():
        parser.error(f"--init {args.init}: no such file")
    if args.device != "auto":
        try:
            torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device}: not a device (auto, cpu, cuda or cuda:N)")
    # A negative budget never ends (progress only falls), and a zero one is no budget.
    for flag, value, least in (("--iters", args.iters, 1), ("--batch", args.batch, 1),
                               ("--log-every", args.log_every, 1), ("--warmup", args.warmup, 0),
                               ("--threads", args.threads, 0), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    for flag, value in (("--minutes", args.minutes), ("--lr", args.lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be a positive number, got {value}")
    for flag, value in (("--val-minutes", args.val_minutes), ("--save-minutes", args.save_minutes)):
        if not (math.isfinite(value) and value >= 0):  # 0: every step; inf: never, and a lost run on a crash
            parser.error(f"{flag} must be a number of minutes, 0 or more, got {value}")
    if not args.clip > 0:  # inf leaves gradients unclipped; 0 would zero them, a negative one reverse them
        parser.error(f"--clip must be positive, got {args.clip}")
    if args.patch < 8 or args.patch % 8:
        parser.error("--patch must be a positive multiple of 8 (MPRNet's stage 1 splits the patch in four)")
    if args.attention_patch and not (0 < args.attention_patch <= MAX_ATTENTION_PATCH and args.attention_patch % 8 == 0):
        # Past the bound the loader would refuse the run's own weights.
        parser.error(f"--attention-patch must be a multiple of 8 (a crop MPRNet could run on) up to "
                     f"{MAX_ATTENTION_PATCH}, or 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export:
        digest = export(Path(args.out) / "last.pt", args.export, half=args.half)
        print(f"{args.export} sha256 {digest}")
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
