"""Cutting an image into equal, overlapping tiles and blending the restored tiles back.

All tiles of one image have the same shape, so they batch together (and with tiles of other
images of that shape). Memory follows the tile size, not the image size.

Blending: each tile's output is weighted by a window that is 1 in its interior and falls off
with a raised cosine across the ``overlap`` pixels next to each edge that touches a neighbour
(edges on the image border keep weight 1). The stitched image is the weighted mean, so where two
tiles meet their contributions cross-fade instead of meeting at a seam.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["MULTIPLE", "DEFAULT_TILE_SIZE", "DEFAULT_TILE_OVERLAP", "Tiling", "TilePlan", "check_tiling",
           "count_tiles", "plan_tiles", "pad_to_multiple", "cut", "merge", "forward_in_batches"]

# MPRNet splits the image into quadrants and down-samples those twice: sides must divide by 8.
MULTIPLE = 8
# 512 px tiles keep a CPU forward pass around a second and its memory near 1 GiB (BENCHMARKS.md);
# 32 px of overlap hide the seams of the bundled and released networks.
DEFAULT_TILE_SIZE = 512
DEFAULT_TILE_OVERLAP = 32


def check_tiling(tile_size: int, overlap: int) -> None:
    """The one statement of what tile settings are valid; ``ValueError`` naming the rule broken."""
    if tile_size < 0:
        raise ValueError(f"tile_size must be 0 (whole images) or positive, got {tile_size}")
    if overlap < 0:
        raise ValueError(f"tile_overlap must be at least 0, got {overlap}")
    if tile_size:
        if tile_size % MULTIPLE:
            raise ValueError(f"tile_size must be a multiple of {MULTIPLE}, got {tile_size}")
        if overlap * 2 >= tile_size:
            raise ValueError(f"tile_overlap ({overlap}) must be under half of tile_size ({tile_size})")


def _pad_amount(size: int, multiple: int = MULTIPLE) -> int:
    return (-size) % multiple


def pad_to_multiple(image: np.ndarray, multiple: int = MULTIPLE) -> np.ndarray:
    """Pad an (..., H, W) array on the bottom and right up to multiples of ``multiple``.

    Reflection, as the reference demo does. Where a side is too short to reflect that far
    (reflection needs ``pad < size``), it reflects repeatedly, and a side of 1 pixel repeats its
    edge: reflection of a single pixel is undefined.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = _pad_amount(height, multiple), _pad_amount(width, multiple)
    lead = [(0, 0)] * (image.ndim - 2)
    while pad_h or pad_w:
        height, width = image.shape[-2:]
        step_h = min(pad_h, height - 1) if height > 1 else 0
        step_w = min(pad_w, width - 1) if width > 1 else 0
        if step_h == 0 and step_w == 0:
            return np.pad(image, lead + [(0, pad_h), (0, pad_w)], mode="edge")
        image = np.pad(image, lead + [(0, step_h), (0, step_w)], mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return image


def _starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    if tile >= length:
        return (0,)
    # The fewest tiles that overlap by at least `overlap`, spread evenly so every seam gets the
    # same cross-fade.
    count = math.ceil((length - overlap) / (tile - overlap))
    return tuple(round(i * (length - tile) / (count - 1)) for i in range(count))


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image lie. Coordinates are in the padded image."""

    height: int
    width: int
    padded_height: int
    padded_width: int
    tile_height: int
    tile_width: int
    overlap: int
    origins: tuple[tuple[int, int], ...]

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.tile_height, self.tile_width

    def __len__(self) -> int:
        return len(self.origins)

    @cached_property
    def _axis_starts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (tuple(sorted({y for y, _ in self.origins})), tuple(sorted({x for _, x in self.origins})))


def _axis(length: int, tile_size: int, overlap: int) -> tuple[int, int, tuple[int, ...]]:
    """Along one side: its padded length, the tile's length and where each tile starts."""
    padded = length + _pad_amount(length)
    tile = padded if tile_size == 0 else min(tile_size, padded)
    return padded, tile, _starts(padded, tile, overlap)


def count_tiles(height: int, width: int, tile_size: int, overlap: int) -> int:
    """``len(plan_tiles(...))`` without listing the tiles, which for a bound on huge images could
    take gigabytes."""
    check_tiling(tile_size, overlap)
    return len(_axis(height, tile_size, overlap)[2]) * len(_axis(width, tile_size, overlap)[2])


def plan_tiles(height: int, width: int, tile_size: int, overlap: int) -> TilePlan:
    """Tiles of at most ``tile_size`` (0: no tiling) overlapping by at least ``overlap`` pixels."""
    check_tiling(tile_size, overlap)
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {width}x{height}")
    padded_h, tile_h, ys = _axis(height, tile_size, overlap)
    padded_w, tile_w, xs = _axis(width, tile_size, overlap)
    return TilePlan(height, width, padded_h, padded_w, tile_h, tile_w, overlap,
                    tuple((y, x) for y in ys for x in xs))


def cut(padded: np.ndarray, plan: TilePlan) -> np.ndarray:
    """(C, Hp, Wp) padded image -> (N, C, th, tw) tiles, in ``plan.origins`` order."""
    th, tw = plan.tile_shape
    return np.stack([padded[:, y:y + th, x:x + tw] for y, x in plan.origins])


def _ramp(tile: int, overlap: int, fade_in: bool, fade_out: bool) -> np.ndarray:
    window = np.ones(tile, dtype=np.float32)
    if overlap == 0:
        return window
    # Strictly positive, so every pixel keeps some weight even where only one tile reaches it.
    rise = np.sin(0.5 * np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap) ** 2
    if fade_in:
        window[:overlap] *= rise
    if fade_out:
        window[-overlap:] *= rise[::-1]
    return window


def merge(tiles: np.ndarray, plan: TilePlan) -> np.ndarray:
    """(N, C, th, tw) restored float32 tiles -> (C, H, W) image at the original size, blended.

    The result may be a view of ``tiles`` (a single tile is only cropped).
    """
    if len(tiles) != len(plan):
        raise ValueError(f"expected {len(plan)} tiles, got {len(tiles)}")
    th, tw = plan.tile_shape
    channels = tiles.shape[1]
    if len(plan) == 1:
        return tiles[0, :, :plan.height, :plan.width]
    ys, xs = plan._axis_starts
    total = np.zeros((channels, plan.padded_height, plan.padded_width), dtype=np.float32)
    weight = np.zeros((plan.padded_height, plan.padded_width), dtype=np.float32)
    for tile, (y, x) in zip(tiles, plan.origins):
        wy = _ramp(th, plan.overlap, y != ys[0], y != ys[-1])
        wx = _ramp(tw, plan.overlap, x != xs[0], x != xs[-1])
        window = wy[:, None] * wx[None, :]
        total[:, y:y + th, x:x + tw] += tile * window
        weight[y:y + th, x:x + tw] += window
    total /= weight
    return total[:, :plan.height, :plan.width]


@dataclass(frozen=True)
class Tiling:
    """How images are cut for the network and put back: a value, shared by every request and device.

    Args:
        tile_size: largest tile side in pixels, a multiple of 8; 0 runs whole images.
        overlap: pixels shared by neighbouring tiles, cross-faded when stitching; under half a tile.

    With ``tile_size`` 0, or an image that fits in one tile, the result is the reference demo's:
    scale to [0, 1], reflect-pad bottom and right to a multiple of 8, (network), crop, round to
    8 bits with ties to even.
    """

    tile_size: int = DEFAULT_TILE_SIZE
    overlap: int = DEFAULT_TILE_OVERLAP

    def __post_init__(self) -> None:
        check_tiling(self.tile_size, self.overlap)

    def plan(self, height: int, width: int) -> TilePlan:
        return plan_tiles(height, width, self.tile_size, self.overlap)

    def cut(self, image: np.ndarray) -> tuple[TilePlan, np.ndarray]:
        """(H, W, 3) uint8 -> the tile plan and (N, 3, th, tw) float32 tiles in [0, 1]."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        plan = self.plan(image.shape[0], image.shape[1])
        # Padded while still 8-bit and scaled tile by tile: a full-size float copy of a
        # 16-megapixel image would be 200 MB more at the peak, for no difference in the values.
        padded = pad_to_multiple(image.transpose(2, 0, 1))
        th, tw = plan.tile_shape
        tiles = np.empty((len(plan), 3, th, tw), dtype=np.float32)
        for tile, (y, x) in zip(tiles, plan.origins):
            np.divide(padded[:, y:y + th, x:x + tw], np.float32(255), out=tile, dtype=np.float32)
        return plan, tiles

    @staticmethod
    def stitch(plan: TilePlan, outputs: np.ndarray) -> np.ndarray:
        """Restored tiles in [0, 1] -> (H, W, 3) uint8 at the original size.

        Works in place: ``outputs`` is overwritten. A 16-megapixel image's float buffers are
        hundreds of megabytes, and every temporary copy of one raises the peak by as much.
        """
        merged = merge(outputs, plan)
        merged *= 255
        np.rint(merged, out=merged)  # ties to even, as the reference's img_as_ubyte does
        return merged.transpose(1, 2, 0).astype(np.uint8)

    def restore(self, image: np.ndarray, forward: Callable[[np.ndarray], np.ndarray],
                batch_size: int = 1) -> np.ndarray:
        """Cut, every tile through ``forward``, stitch: offline, in this thread."""
        plan, tiles = self.cut(image)
        return self.stitch(plan, forward_in_batches(forward, tiles, batch_size))


def forward_in_batches(forward: Callable[[np.ndarray], np.ndarray], tiles: np.ndarray, batch_size: int) -> np.ndarray:
    """``forward`` over ``tiles`` ``batch_size`` at a time, without a queue: for offline use."""
    outputs = np.empty_like(tiles)
    for start in range(0, len(tiles), batch_size):
        outputs[start:start + batch_size] = forward(tiles[start:start + batch_size])
    return outputs
