"""One restore's stages around the batched forward pass: bytes -> tiles, restored tiles -> PNG.

    prepared = pipeline.prepare(upload_bytes)        # decode (or pipeline.cut(decoded)), cut
    outputs = <every tile through the network>       # the batching queue, or an engine directly
    png = pipeline.finish(prepared, outputs)         # stitch, back to the upload's kind, encode

The HTTP service decodes in a decoder process (:mod:`service.decoding`), then runs ``cut`` and
``finish`` in worker threads around the queue; the command line runs the same stages around an
engine of its own, so both give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import imaging
from .batching import TooManyTiles
from .tiling import TilePlan, Tiling, forward_in_batches

__all__ = ["RestorePipeline", "PreparedImage"]


@dataclass
class PreparedImage:
    """A decoded upload cut into tiles, with what ``finish`` needs to put it back."""

    decoded: imaging.DecodedImage
    plan: TilePlan
    tiles: np.ndarray | None  # (N, 3, th, tw) float32 in [0, 1]; None once handed on


@dataclass(frozen=True)
class RestorePipeline:
    """Args:
        tiling: how images are cut and blended back.
        max_pixels: the largest image accepted, checked from the header before decoding.
        max_tiles: the most tiles one image may need (what the queue can ever hold).
    """

    tiling: Tiling
    max_pixels: int | None = None
    max_tiles: int | None = None

    def prepare(self, data: bytes) -> PreparedImage:
        """Raises :class:`imaging.ImageError` for a bad upload, :class:`TooManyTiles` for one
        whose tiles could never fit in the queue."""
        return self.cut(imaging.decode(data, self.max_pixels))

    def cut(self, decoded: imaging.DecodedImage) -> PreparedImage:
        # Planned before cutting so that an image with too many tiles (a 1 x 10^6 strip, say)
        # is refused before its tiles are allocated.
        planned = len(self.tiling.plan(decoded.height, decoded.width))
        if self.max_tiles is not None and planned > self.max_tiles:
            raise TooManyTiles(f"the {decoded.width}x{decoded.height} image needs {planned} tiles; "
                               f"at most {self.max_tiles} fit in the queue")
        plan, tiles = self.tiling.cut(decoded.rgb)
        return PreparedImage(decoded, plan, tiles)

    def finish(self, prepared: PreparedImage, outputs: np.ndarray) -> bytes:
        """The restored tiles -> PNG bytes at the upload's size, in its kind (grayscale, alpha).
        ``outputs`` is consumed (stitched in place)."""
        return imaging.encode_png(self.tiling.stitch(prepared.plan, outputs), prepared.decoded)

    def restore(self, data: bytes, forward: Callable[[np.ndarray], np.ndarray], batch_size: int = 1) -> bytes:
        """Offline, in this thread: ``prepare``, every tile through ``forward``, ``finish``."""
        prepared = self.prepare(data)
        return self.finish(prepared, forward_in_batches(forward, prepared.tiles, batch_size))
