"""The inference engine: uint8 RGB in, uint8 RGB of the same size out.

Three steps, kept separate so that the service's batching queue can interleave them across
requests: :meth:`Engine.cut` (pad, tile), :meth:`Engine.forward` (one batch of equal tiles
through the network), :meth:`Engine.stitch` (blend, crop, quantise). :meth:`Engine.restore`
chains them for offline use.

With tiling off, or an image that fits in one tile, the result is the reference demo's: scale
to [0, 1], reflect-pad bottom and right to a multiple of 8, take stage 3, clamp, crop, round to
8 bits with ties to even.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models import MPRNetConfig, load_model

from . import tiling
from .tiling import TilePlan

__all__ = ["Engine", "PRECISIONS", "resolve_device", "resolve_devices"]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but this machine has no usable CUDA device")
    return resolved


def resolve_devices(devices: Sequence[str]) -> list[torch.device]:
    """Each of ``devices`` resolved, repeats kept; ``["all"]`` is every visible CUDA device, else the CPU."""
    if list(devices) == ["all"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", index) for index in range(count)] or [torch.device("cpu")]
    return [resolve_device(device) for device in devices]


class Engine:
    """One MPRNet on one device, with its precision and tiling settings.

    Args:
        model: an MPRNet (e.g. from :func:`models.load_model`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, or ``fp16``/``bf16`` (autocast; CUDA only).
        tile_size: largest tile side in pixels, a multiple of 8; 0 runs whole images.
        tile_overlap: pixels shared by neighbouring tiles, cross-faded when stitching.
    """

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device = "auto", precision: str = "fp32",
                 tile_size: int = 512, tile_overlap: int = 32):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"precision {precision} needs a CUDA device; use fp32 on {self.device}")
        tiling.plan_tiles(8, 8, tile_size, tile_overlap)  # validates both up front
        self.precision = precision
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.config: MPRNetConfig | None = getattr(model, "config", None)
        if self.device.type == "cuda":
            # The serving tile shape is fixed, so cuDNN's per-shape autotuning pays for itself.
            torch.backends.cudnn.benchmark = True

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs) -> "Engine":
        engine = cls(load_model(path), **kwargs)
        engine.weights_path = Path(path)
        return engine

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def plan(self, height: int, width: int) -> TilePlan:
        return tiling.plan_tiles(height, width, self.tile_size, self.tile_overlap)

    def cut(self, image: np.ndarray) -> tuple[TilePlan, np.ndarray]:
        """(H, W, 3) uint8 -> the tile plan and (N, 3, th, tw) float32 tiles in [0, 1]."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        plan = self.plan(image.shape[0], image.shape[1])
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)
        return plan, tiling.cut(tiling.pad_to_multiple(chw), plan)

    @torch.inference_mode()
    def forward(self, tiles: np.ndarray) -> np.ndarray:
        """One batch of equal (N, 3, h, w) tiles through the network; stage 3, clamped to [0, 1]."""
        batch = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32"):
            restored = self.model(batch)[0]
        return restored.float().clamp_(0, 1).cpu().numpy()

    def stitch(self, plan: TilePlan, outputs: np.ndarray) -> np.ndarray:
        """Restored tiles -> (H, W, 3) uint8 at the original size."""
        merged = tiling.merge(outputs, plan)
        # np.rint rounds ties to even, as the reference's img_as_ubyte does.
        return np.rint(merged.transpose(1, 2, 0) * 255).astype(np.uint8)

    def restore(self, image: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Restore one (H, W, 3) uint8 image; tiles run ``batch_size`` at a time."""
        if batch_size is None:
            batch_size = 4 if self.device.type == "cuda" else 1
        plan, tiles = self.cut(image)
        outputs = np.empty_like(tiles)
        for start in range(0, len(tiles), batch_size):
            outputs[start:start + batch_size] = self.forward(tiles[start:start + batch_size])
        return self.stitch(plan, outputs)

    def warmup(self, batch_size: int = 1) -> None:
        """One forward pass of the serving tile shape, so no request pays for first-call setup."""
        side = self.tile_size or 256
        self.forward(np.zeros((batch_size, 3, side, side), dtype=np.float32))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {
            "architecture": self.config.as_kwargs() if self.config else None,
            "parameters": self.parameter_count,
            "device": str(self.device),
            "precision": self.precision,
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
        }
