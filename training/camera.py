"""Noise as a camera makes it: added to linear raw Bayer samples, then processed to sRGB.

White Gaussian noise on sRGB pixels is independent from pixel to pixel and channel to channel.
Real photos' noise is not: the sensor's shot and read noise is added to one colour sample per
pixel (a Bayer mosaic), demosaicing spreads each sample over its neighbours, the colour-correction
matrix mixes channels, white balance and the tone curve amplify it unevenly (dark and red/blue
pixels most), in-camera sharpening and chroma smoothing change its grain, JPEG quantises it in
8x8 blocks with subsampled chroma, and resizing the photo shrinks or spreads the grain. A
denoiser that only saw white noise leaves most of that correlated noise in place (issue 16).

:func:`camera_noise` runs a clean sRGB photo backwards to linear raw (an "unprocessing" of the
image: inverse tone curve, inverse gamma, inverse colour correction, inverse white balance,
mosaic), adds signal-dependent noise there and runs it forwards again with the same camera
settings. Every setting is drawn from the given Generator, or fixed through :class:`CameraRanges`,
whose defaults are the training ranges; the evaluation draws some settings outside them.

The small array helpers every degradation family shares live here too, at the bottom of
``training``'s imports: float conversion, Gaussian filtering, resizing, JPEG, bilinear splatting
and log-uniform draws.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

__all__ = ["CameraRanges", "TRAINING_RANGES", "camera_noise", "mosaic", "demosaic_bilinear", "jpeg",
           "resize_plane", "estimate_noise_sigma", "process", "unprocess", "Camera", "draw_camera"]

GAMMA = 2.2
# A tone curve's inverse is tabulated on this many levels: far finer than 8-bit input.
TONE_TABLE = 4096


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 or float HxWx3 -> float32 in [0, 1]: the one conversion every degradation family uses."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise TypeError(f"expected uint8 or float image, got {image.dtype}")


def from_float(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    levels = np.clip(np.rint(result * 255.0), 0, 255)
    if like.dtype == np.uint8:
        return levels.astype(np.uint8)
    return (levels / 255.0).astype(like.dtype)


@dataclass(frozen=True)
class CameraRanges:
    """The ranges a camera's settings are drawn from (uniform unless said otherwise).

    Shot noise ``shot`` is the variance gain of the raw signal (variance ``shot * x + read`` for a
    raw value ``x`` in [0, 1]), drawn log-uniformly; the read-noise variance follows it along the
    log-linear relation measured on real sensors, ``log(read) = 2.18 log(shot) + 1.2`` (Brooks et
    al., "Unprocessing Images for Learned Raw Denoising", 2019), with a spread of 0.26 in the log.
    ``resize_chances`` are the chances of spreading the grain (noise made at a lower resolution
    and enlarged, as in an enlarged or rescanned photo) and of shrinking it (made at a higher
    resolution and reduced); the scale factor of each is drawn from its range.
    """

    shot: tuple[float, float] = (1e-4, 1.2e-2)
    red_gain: tuple[float, float] = (1.6, 2.4)
    blue_gain: tuple[float, float] = (1.3, 2.0)
    saturation: tuple[float, float] = (0.0, 0.6)   # off-diagonal strength of the colour correction
    tone_chance: float = 0.6                        # an S-shaped tone curve, or only the gamma
    sharpen_chance: float = 0.3
    sharpen_amount: tuple[float, float] = (0.3, 1.2)
    chroma_smooth_chance: float = 0.3
    chroma_smooth_sigma: tuple[float, float] = (0.8, 2.0)
    jpeg_chance: float = 0.7
    jpeg_quality: tuple[float, float] = (40.0, 95.0)
    resize_chances: tuple[float, float] = (0.35, 0.15)  # spread, shrink
    spread: tuple[float, float] = (1.2, 2.5)
    shrink: tuple[float, float] = (1.2, 2.0)


TRAINING_RANGES = CameraRanges()


@dataclass(frozen=True)
class Camera:
    """One camera's settings: enough to unprocess a photo and process it again identically."""

    shot: float
    read: float
    red_gain: float
    blue_gain: float
    ccm: np.ndarray          # linear camera RGB -> linear sRGB, rows summing to 1
    tone: float              # 0: gamma only; up to 1: blended with a smoothstep S-curve
    bayer_phase: tuple[int, int]
    sharpen: float           # unsharp-mask amount, 0 for none
    chroma_sigma: float      # Gaussian smoothing of the chroma planes, 0 for none
    jpeg_quality: int        # 0 for none
    resize: float            # > 1 spreads the grain by this factor, < 1 shrinks it by 1 / resize


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def draw_camera(rng: np.random.Generator, ranges: CameraRanges = TRAINING_RANGES) -> Camera:
    shot = float(np.exp(rng.uniform(np.log(ranges.shot[0]), np.log(ranges.shot[1]))))
    read = float(np.exp(2.18 * np.log(shot) + 1.2 + rng.normal(0.0, 0.26)))
    # A colour-correction matrix as cameras have: a saturating identity (positive diagonal,
    # negative off-diagonal), each row summing to 1 so that grey stays grey.
    off = rng.uniform(0.0, 1.0, size=(3, 3)) * _uniform(rng, ranges.saturation)
    np.fill_diagonal(off, 0.0)
    ccm = -off
    ccm[np.diag_indices(3)] = 1.0 + off.sum(axis=1)
    spread_chance, shrink_chance = ranges.resize_chances
    pick = rng.random()
    if pick < spread_chance:
        resize = _uniform(rng, ranges.spread)
    elif pick < spread_chance + shrink_chance:
        resize = 1.0 / _uniform(rng, ranges.shrink)
    else:
        resize = 1.0
    return Camera(
        shot=shot, read=read,
        red_gain=_uniform(rng, ranges.red_gain), blue_gain=_uniform(rng, ranges.blue_gain),
        ccm=ccm.astype(np.float32),
        tone=_uniform(rng, (0.3, 1.0)) if rng.random() < ranges.tone_chance else 0.0,
        bayer_phase=(int(rng.integers(2)), int(rng.integers(2))),
        sharpen=_uniform(rng, ranges.sharpen_amount) if rng.random() < ranges.sharpen_chance else 0.0,
        chroma_sigma=(_uniform(rng, ranges.chroma_smooth_sigma)
                      if rng.random() < ranges.chroma_smooth_chance else 0.0),
        jpeg_quality=int(round(_uniform(rng, ranges.jpeg_quality))) if rng.random() < ranges.jpeg_chance else 0,
        resize=resize)


# ---------------------------------------------------------------------------------------------
# Tone, gamma, colour
# ---------------------------------------------------------------------------------------------

def _tone_curve(x: np.ndarray, strength: float) -> np.ndarray:
    """Identity blended with smoothstep: the S-curve cameras use to add contrast. Increasing for
    any strength below 1, so it has an inverse."""
    return (1.0 - strength) * x + strength * (3.0 * x * x - 2.0 * x * x * x)


def _inverse_tone_curve(y: np.ndarray, strength: float) -> np.ndarray:
    if strength <= 0:
        return y
    # Capped below 1: at full strength the curve is flat at 0 and 1 and its inverse unbounded.
    strength = min(strength, 0.95)
    levels = np.linspace(0.0, 1.0, TONE_TABLE, dtype=np.float32)
    return np.interp(y, _tone_curve(levels, strength), levels).astype(np.float32)


def unprocess(srgb: np.ndarray, camera: Camera) -> np.ndarray:
    """sRGB in [0, 1] -> linear camera RGB (before white balance), HxWx3."""
    toned = _inverse_tone_curve(np.clip(srgb, 0.0, 1.0), min(camera.tone, 0.95))
    linear = toned ** GAMMA
    camera_rgb = linear @ np.linalg.inv(camera.ccm).T.astype(np.float32)
    gains = np.array([camera.red_gain, 1.0, camera.blue_gain], np.float32)
    return np.clip(camera_rgb / gains, 0.0, 1.0).astype(np.float32)


def process(camera_rgb: np.ndarray, camera: Camera) -> np.ndarray:
    """Linear camera RGB -> sRGB in [0, 1] (before sharpening, chroma smoothing and JPEG)."""
    gains = np.array([camera.red_gain, 1.0, camera.blue_gain], np.float32)
    linear = np.clip((camera_rgb * gains) @ camera.ccm.T, 0.0, 1.0)
    return _tone_curve(linear ** (1.0 / GAMMA), min(camera.tone, 0.95)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Bayer mosaic
# ---------------------------------------------------------------------------------------------

def _bayer_masks(shape: tuple[int, int], phase: tuple[int, int]) -> np.ndarray:
    """HxWx3 boolean masks of an RGGB mosaic shifted by ``phase`` (so GRBG, GBRG and BGGR too)."""
    rows = (np.arange(shape[0]) + phase[0]) % 2
    cols = (np.arange(shape[1]) + phase[1]) % 2
    r, c = rows[:, None], cols[None, :]
    red = (r == 0) & (c == 0)
    blue = (r == 1) & (c == 1)
    return np.stack([red, ~(red | blue), blue], axis=-1)


def mosaic(rgb: np.ndarray, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The one colour sample per pixel a Bayer sensor records: HxWx3 -> HxW."""
    return (rgb * _bayer_masks(rgb.shape[:2], phase)).sum(axis=-1).astype(np.float32)


def _filter3(plane: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """3x3 correlation of an HxW (or HxWxC) array with ``taps``, reflecting at the borders."""
    padded = np.pad(plane, ((1, 1), (1, 1)) + ((0, 0),) * (plane.ndim - 2), mode="reflect")
    h, w = plane.shape[:2]
    out = np.zeros(plane.shape, np.float32)
    for dy in range(3):
        for dx in range(3):
            if taps[dy, dx]:
                out += np.float32(taps[dy, dx]) * padded[dy:dy + h, dx:dx + w]
    return out


# Red and blue sit on a grid of every other row and column: the tent reaches their 2 or 4
# nearest samples. Green is a quincunx whose diagonal neighbours are green too, so its kernel is
# the cross alone (the tent would average a recorded green with its diagonals).
_TENT = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32)
_CROSS = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32)


def demosaic_bilinear(raw: np.ndarray, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Bilinear demosaicing: each missing sample is the mean of its nearest recorded ones.

    Done as normalised convolution: filtering the sparse samples and the mask with the same
    kernel and dividing gives, on a Bayer grid, exactly the average of the 2 or 4 nearest
    neighbours of that colour, and leaves recorded samples unchanged. Each recorded sample
    (and its noise) so ends up in up to nine output pixels: the correlation real noise has.
    """
    masks = _bayer_masks(raw.shape, phase).astype(np.float32)
    samples = raw[..., None] * masks
    planes = []
    for channel, taps in enumerate((_TENT, _CROSS, _TENT)):
        planes.append(_filter3(samples[..., channel], taps) / _filter3(masks[..., channel], taps))
    return np.stack(planes, axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# In-camera finishing: sharpening, chroma smoothing, resizing, JPEG
# ---------------------------------------------------------------------------------------------

def _gaussian_taps(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def gaussian_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the first two axes, reflecting at the borders."""
    taps = _gaussian_taps(sigma)
    radius = len(taps) // 2
    out = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        # Reflect needs a side longer than the radius; tiny patches fall back to edge padding.
        mode = "reflect" if out.shape[axis] > radius else "edge"
        padded = np.pad(out, pad, mode=mode)
        length = out.shape[axis]
        acc = np.zeros_like(out)
        for k, tap in enumerate(taps):
            acc += tap * np.take(padded, np.arange(k, k + length), axis=axis)
        out = acc
    return out


def _sharpen(rgb: np.ndarray, amount: float) -> np.ndarray:
    """Unsharp masking as cameras do it: it also sharpens, and so amplifies, the noise."""
    return rgb + amount * (rgb - gaussian_filter(rgb, 1.0))


_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                       np.float32)


def _smooth_chroma(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Blur only the colour-difference planes, as phone pipelines do against colour noise:
    the chroma noise left is low-frequency blotches, not pixel-sized specks."""
    ycc = rgb @ _RGB_TO_YCC.T
    ycc[..., 1:] = gaussian_filter(ycc[..., 1:], sigma)
    return ycc @ np.linalg.inv(_RGB_TO_YCC).T.astype(np.float32)


def resize_plane(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a float HxW or HxWxC array to ``shape`` (PIL, per channel, in float32)."""
    size = (shape[1], shape[0])
    if image.ndim == 2:
        return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize(size, Image.BICUBIC))
    return np.stack([resize_plane(image[..., c], shape) for c in range(image.shape[2])], axis=-1)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of a float RGB image at ``quality`` (PIL's default 4:2:0 chroma
    subsampling, as most cameras and phones save); returns float in [0, 1] on 8-bit levels."""
    levels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB")).astype(np.float32) / 255.0


def splat(points: np.ndarray, shape: int | tuple[int, int], weights: np.ndarray | None = None) -> np.ndarray:
    """Accumulate sub-pixel (x, y) points into an HxW grid (``shape``; an int is a square) with
    bilinear weights; points off the grid are lost.

    Bilinear splatting keeps thin shapes (blur trajectories, rain streaks) anti-aliased, so their
    spectra look like a real camera's and not like a staircase.
    """
    height, width = (shape, shape) if isinstance(shape, int) else shape
    grid = np.zeros((height, width), np.float64)
    weights = np.ones(len(points)) if weights is None else weights
    x0 = np.floor(points[:, 0]).astype(int)
    y0 = np.floor(points[:, 1]).astype(int)
    fx, fy = points[:, 0] - x0, points[:, 1] - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = x0 + dx, y0 + dy
        inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        np.add.at(grid, (ys[inside], xs[inside]), (w * weights)[inside])
    return grid


def log_uniform(rng: np.random.Generator, low: float, high: float, size=None):
    """A draw whose logarithm is uniform: for sizes and densities, where the small end is the
    common case and a uniform draw would rarely reach it."""
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size))


# ---------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------

def _noisy_through_camera(srgb: np.ndarray, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """Unprocess, mosaic, add shot and read noise on the raw samples, demosaic, process."""
    raw = mosaic(unprocess(srgb, camera), camera.bayer_phase)
    variance = camera.shot * raw + camera.read
    noisy_raw = raw + np.sqrt(variance).astype(np.float32) * rng.standard_normal(raw.shape, dtype=np.float32)
    rgb = process(demosaic_bilinear(noisy_raw, camera.bayer_phase), camera)
    if camera.sharpen:
        rgb = _sharpen(rgb, camera.sharpen)
    if camera.chroma_sigma:
        rgb = _smooth_chroma(rgb, camera.chroma_sigma)
    return rgb


def _reference_through_camera(srgb: np.ndarray, camera: Camera) -> np.ndarray:
    """The same pipeline without noise: what the camera's processing alone does to the photo.

    Unprocessing and processing are inverses only up to clipping (saturated colours leave the
    camera's gamut), and the bilinear demosaic softens edges; both are subtracted out so that
    what is added to the clean photo is noise, not a changed photo the network would have to
    learn to undo.
    """
    rgb = process(demosaic_bilinear(mosaic(unprocess(srgb, camera), camera.bayer_phase), camera.bayer_phase),
                  camera)
    if camera.sharpen:
        rgb = _sharpen(rgb, camera.sharpen)
    if camera.chroma_sigma:
        rgb = _smooth_chroma(rgb, camera.chroma_sigma)
    return rgb


def camera_residual(srgb: np.ndarray, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """The noise the camera leaves on ``srgb`` (HxWx3 float), at the photo's own size.

    With ``camera.resize`` > 1 the pipeline runs on the photo reduced by that factor and its
    noise is enlarged back (coarse, blotchy grain spread over several pixels); below 1, on the
    photo enlarged by its inverse, and the noise is reduced back (finer and weaker grain).
    Resizing the noise rather than the photo keeps the photo's own detail, so the network
    learns to remove grain, not to sharpen.
    """
    h, w = srgb.shape[:2]
    if camera.resize == 1.0:
        working = srgb
    else:
        working_shape = (max(4, int(round(h / camera.resize))), max(4, int(round(w / camera.resize))))
        working = np.clip(resize_plane(srgb, working_shape), 0.0, 1.0)
    residual = _noisy_through_camera(working, camera, rng) - _reference_through_camera(working, camera)
    if working is not srgb:
        residual = resize_plane(residual, (h, w))
    return residual.astype(np.float32)


def camera_noise(image: np.ndarray, rng: np.random.Generator, ranges: CameraRanges = TRAINING_RANGES,
                 camera: Camera | None = None) -> np.ndarray:
    """A photo as a camera with drawn (or given) settings would have recorded it noisily.

    Same shape and dtype as ``image`` (uint8, or float in [0, 1]); 8-bit levels; JPEG last
    when the camera saves JPEG.
    """
    clean = to_float(image)
    camera = draw_camera(rng, ranges) if camera is None else camera
    noisy = np.clip(clean + camera_residual(clean, camera, rng), 0.0, 1.0)
    if camera.jpeg_quality:
        noisy = jpeg(noisy, camera.jpeg_quality)
    return from_float(noisy, image)


def with_settings(ranges: CameraRanges = TRAINING_RANGES, **changes) -> CameraRanges:
    """``ranges`` with some fields changed: how the evaluation draws settings training never did."""
    return replace(ranges, **changes)


# ---------------------------------------------------------------------------------------------
# No-reference noise level
# ---------------------------------------------------------------------------------------------

def estimate_noise_sigma(image: np.ndarray) -> float:
    """Noise standard deviation (0-255 scale) estimated from the photo alone.

    Donoho's estimator: the finest diagonal (HH) band of a one-level Haar wavelet transform
    holds little of a natural photo but all frequencies' share of white noise, and its median
    absolute value over 0.6745 is the noise's standard deviation for Gaussian noise (the median
    ignores the few large coefficients edges make). Taken per channel and averaged. On 8-bit
    pixels the coefficients are multiples of 0.5, so a plain median moves in steps of 0.74; the
    mean of the absolute values between their 45th and 55th percentiles (the same quantity for
    Gaussian noise, to well under 1 %) resolves small changes. Noise coarser than a pixel puts
    less of itself in the finest band, so the figure understates such noise, and a photo's own
    fine texture reads as a little noise; comparing the figure before and after restoration
    still says what fraction is left.
    """
    array = np.asarray(image)
    pixels = array.astype(np.float64) * (255.0 if np.issubdtype(array.dtype, np.floating) else 1.0)
    h, w = (pixels.shape[0] // 2) * 2, (pixels.shape[1] // 2) * 2
    p = pixels[:h, :w]
    diagonal = (p[0::2, 0::2] - p[0::2, 1::2] - p[1::2, 0::2] + p[1::2, 1::2]) / 2.0
    if diagonal.ndim == 2:
        diagonal = diagonal[..., None]
    return float(np.mean([_central_median(np.abs(diagonal[..., c])) / 0.6745 for c in range(diagonal.shape[2])]))


def _central_median(values: np.ndarray) -> float:
    low, high = np.percentile(values, [45.0, 55.0])
    central = values[(values >= low) & (values <= high)]
    return float(central.mean()) if central.size else float(np.median(values))
