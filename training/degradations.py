"""Synthetic degradations that turn clean photos into training and evaluation inputs.

Every function takes an HxWx3 image, either ``uint8`` or floating point in [0, 1], and a
:class:`numpy.random.Generator`; it returns an image of the same shape and dtype. All randomness
comes from that generator, so a seed fixes the result. Outputs are quantised to 8-bit levels even
for float inputs, because the service only ever sees 8-bit files and the network should learn to
undo the rounding as well.

The ranges are deliberately wide: external checks degrade unseen photos with their own kernels,
noise levels and streak patterns, and a model that learned one pattern would fail them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["add_noise", "blur", "add_rain", "random_blur_kernel", "shake_kernel", "motion_kernel",
           "disc_kernel", "gaussian_kernel", "DEGRADATIONS", "degrade"]

MAX_KERNEL = 31


def _to_float(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise TypeError(f"expected uint8 or float image, got {image.dtype}")


def _from_float(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    levels = np.clip(np.rint(result * 255.0), 0, 255)
    if like.dtype == np.uint8:
        return levels.astype(np.uint8)
    return (levels / 255.0).astype(like.dtype)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------

def add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float | None = None,
              poisson_gaussian: bool | None = None) -> np.ndarray:
    """Camera-like noise, quantised to 8 bits.

    Additive white Gaussian noise with standard deviation ``sigma`` on the 0-255 scale, drawn
    uniformly from [0, 55] unless given. Half the time (unless ``poisson_gaussian`` says) the
    noise is instead signal-dependent, Poisson-Gaussian: variance ``a * x + b`` with the shot
    term ``a`` chosen so that mid-grey gets a standard deviation uniformly in [0, 55] and a read
    term ``b`` up to a third of that; this is how real sensors behave, brighter pixels noisier.
    Passing ``sigma`` alone gives plain Gaussian noise, which is what the evaluation uses.
    """
    clean = _to_float(image)
    if poisson_gaussian is None:
        poisson_gaussian = sigma is None and bool(rng.random() < 0.5)
    if sigma is None:
        sigma = float(rng.uniform(0.0, 55.0))
    std = sigma / 255.0
    if poisson_gaussian:
        read = std * float(rng.uniform(0.0, 1.0 / 3.0))
        # Choose the shot-noise gain so that the total std at x = 0.5 equals ``std``.
        shot = max(std * std - read * read, 0.0) / 0.5
        std_map = np.sqrt(shot * clean + read * read)
        noisy = clean + std_map * rng.standard_normal(clean.shape, dtype=np.float32)
    else:
        noisy = clean + np.float32(std) * rng.standard_normal(clean.shape, dtype=np.float32)
    return _from_float(noisy, image)


# --------------------------------------------------------------------------------------------
# Blur kernels
# --------------------------------------------------------------------------------------------

def _splat(points: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Accumulate sub-pixel (x, y) points into a size x size grid with bilinear weights.

    Bilinear splatting keeps thin kernels (lines, trajectories) anti-aliased, so their spectra
    look like a real camera's and not like a staircase.
    """
    kernel = np.zeros((size, size), np.float64)
    weights = np.ones(len(points)) if weights is None else weights
    x0 = np.floor(points[:, 0]).astype(int)
    y0 = np.floor(points[:, 1]).astype(int)
    fx, fy = points[:, 0] - x0, points[:, 1] - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = x0 + dx, y0 + dy
        inside = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
        np.add.at(kernel, (ys[inside], xs[inside]), (w * weights)[inside])
    return kernel


def _centred(points: np.ndarray, size: int) -> np.ndarray:
    """Shift points so that their centre of mass lands on the kernel's centre pixel.

    A kernel whose mass is off-centre also translates the image, which the network cannot know
    about and would learn as a blur of its own.
    """
    return points - points.mean(axis=0) + (size - 1) / 2.0


def _normalised(kernel: np.ndarray) -> np.ndarray:
    total = kernel.sum()
    if total <= 0:
        kernel = np.zeros_like(kernel)
        kernel[kernel.shape[0] // 2, kernel.shape[1] // 2] = 1.0
        total = 1.0
    return (kernel / total).astype(np.float32)


def _log_uniform(rng: np.random.Generator, low: float, high: float, size=None):
    """Blur sizes are drawn log-uniformly: mild blur is the common case in real photos, and with
    uniform sizes a small network learned to over-sharpen it (-3 dB on 4 px shake, measured)
    while still failing the large kernels that dominated its training."""
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size))


def shake_kernel(rng: np.random.Generator, size: int = MAX_KERNEL, extent: float | None = None) -> np.ndarray:
    """Camera-shake kernel: the path of a hand-held camera during the exposure.

    The path is a random walk whose velocity has inertia (so it curves smoothly), is pulled back
    towards the start (hands correct their drift) and sometimes jerks; its length is scaled to
    ``extent`` pixels (log-uniform in [3, size - 4] unless given). Exposure time along the path is
    uniform, so slow parts of the path receive more light, as in a real photo.
    """
    steps = 256
    extent = float(_log_uniform(rng, 3.0, size - 4.0)) if extent is None else float(extent)
    inertia = rng.uniform(0.9, 0.99)
    pull = rng.uniform(0.0, 0.002)
    jerk_chance = rng.uniform(0.0, 0.02)
    velocity = rng.standard_normal(2)
    position = np.zeros(2)
    path = np.empty((steps, 2))
    for i in range(steps):
        noise = rng.standard_normal(2)
        if rng.random() < jerk_chance:
            noise *= 20.0
        velocity = inertia * velocity + (1 - inertia) * noise - pull * position
        position = position + velocity
        path[i] = position
    span = np.ptp(path, axis=0).max()
    path *= extent / max(span, 1e-6)
    path = _centred(path, size)
    return _normalised(_splat(np.clip(path, 0, size - 1.001), size))


def motion_kernel(rng: np.random.Generator, size: int = MAX_KERNEL, length: float | None = None,
                  angle: float | None = None) -> np.ndarray:
    """Linear motion blur: a straight segment ``length`` px long (log-uniform in [3, size - 2]) at
    ``angle`` radians (uniform)."""
    length = float(_log_uniform(rng, 3.0, size - 2.0)) if length is None else float(length)
    angle = float(rng.uniform(0, np.pi)) if angle is None else float(angle)
    t = np.linspace(-0.5, 0.5, int(np.ceil(length * 4)) + 2)
    points = np.stack([t * length * np.cos(angle), t * length * np.sin(angle)], axis=1)
    return _normalised(_splat(_centred(points, size), size))


def disc_kernel(rng: np.random.Generator, size: int = MAX_KERNEL, radius: float | None = None) -> np.ndarray:
    """Defocus blur: a uniform disc of ``radius`` px (log-uniform in [1, size / 2 - 1]) with
    anti-aliased edges (4x4 supersampling)."""
    radius = float(_log_uniform(rng, 1.0, size / 2.0 - 1.0)) if radius is None else float(radius)
    sub = (np.arange(size * 4) + 0.5) / 4.0 - size / 2.0
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    inside = (xx * xx + yy * yy <= radius * radius).astype(np.float64)
    return _normalised(inside.reshape(size, 4, size, 4).mean(axis=(1, 3)))


def gaussian_kernel(rng: np.random.Generator, size: int = MAX_KERNEL, sigma: tuple[float, float] | None = None,
                    angle: float | None = None) -> np.ndarray:
    """Gaussian blur, anisotropic and rotated: standard deviations log-uniform in [0.5, size / 6]
    per axis unless given."""
    if sigma is None:
        sigma = tuple(_log_uniform(rng, 0.5, size / 6.0, size=2))
    angle = float(rng.uniform(0, np.pi)) if angle is None else float(angle)
    coords = np.arange(size) - (size - 1) / 2.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    return _normalised(np.exp(-0.5 * ((u / sigma[0]) ** 2 + (v / sigma[1]) ** 2)))


_KERNELS: tuple[tuple[float, Callable[..., np.ndarray]], ...] = (
    # Camera shake is what the deblurring task is about, so it gets the largest share.
    (0.5, shake_kernel), (0.2, motion_kernel), (0.15, disc_kernel), (0.15, gaussian_kernel))


def random_blur_kernel(rng: np.random.Generator, size: int = MAX_KERNEL) -> np.ndarray:
    """A kernel from the training mixture: 50 % camera shake, 20 % linear motion, 15 % defocus
    disc, 15 % Gaussian."""
    weights = np.array([w for w, _ in _KERNELS])
    choice = rng.choice(len(_KERNELS), p=weights / weights.sum())
    return _KERNELS[choice][1](rng, size)


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filter each channel with ``kernel`` (true convolution), reflecting at the borders.

    FFT keeps the cost independent of the kernel's size, which matters for 31 px kernels.
    """
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(image, ((ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)), mode="reflect")
    shape = padded.shape[:2]
    spectrum = np.fft.rfft2(padded, s=shape, axes=(0, 1))
    spectrum *= np.fft.rfft2(kernel, s=shape)[..., None]
    full = np.fft.irfft2(spectrum, s=shape, axes=(0, 1))
    # Circular convolution of the padded image: the valid part starts at the kernel's far corner.
    return full[kh - 1:kh - 1 + image.shape[0], kw - 1:kw - 1 + image.shape[1]].astype(np.float32)


def blur(image: np.ndarray, rng: np.random.Generator, kernel: np.ndarray | None = None,
         noise_sigma: float | None = None) -> np.ndarray:
    """Blur with ``kernel`` (from :func:`random_blur_kernel` if not given), then add a little
    sensor noise (Gaussian, sigma uniform in [0, 2] on the 0-255 scale unless given) and
    quantise, as a real blurred photo would be recorded."""
    clean = _to_float(image)
    kernel = random_blur_kernel(rng) if kernel is None else np.asarray(kernel, np.float32)
    blurred = _convolve(clean, kernel)
    sigma = float(rng.uniform(0.0, 2.0)) if noise_sigma is None else float(noise_sigma)
    blurred += np.float32(sigma / 255.0) * rng.standard_normal(blurred.shape, dtype=np.float32)
    return _from_float(blurred, image)


# --------------------------------------------------------------------------------------------
# Rain
# --------------------------------------------------------------------------------------------

def _streak_kernel(length: float, angle: float, width: float) -> np.ndarray:
    """A single streak's shape: a segment blurred across its direction by ``width``, peak 1.

    Peak 1 (not sum 1) so that a drop's brightness does not fall with its length.
    """
    size = int(np.ceil(length + 3 * width)) | 1
    t = np.linspace(-0.5, 0.5, int(np.ceil(length * 3)) + 2)
    # Drops thin out towards the ends of a streak.
    taper = np.sin(np.pi * (t + 0.5)) ** 0.5 + 0.05
    points = np.stack([t * length * np.sin(angle), t * length * np.cos(angle)], axis=1)
    line = _splat(_centred(points, size), size, taper)
    sigma = max(width / 2.0, 0.35)
    radius = int(np.ceil(2.5 * sigma))
    across = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    # Separable thickening of the line in both axes approximates a round brush.
    line = np.apply_along_axis(lambda r: np.convolve(r, across, mode="same"), 0, line)
    line = np.apply_along_axis(lambda r: np.convolve(r, across, mode="same"), 1, line)
    return (line / max(line.max(), 1e-8)).astype(np.float32)


def rain_layer(shape: tuple[int, int], rng: np.random.Generator, density: float, length: float,
               angle: float, width: float, brightness: float) -> np.ndarray:
    """An HxW map in [0, 1] of streaks: drops at ``density`` per pixel, each drawn as a streak of
    ``length`` px at ``angle`` radians from vertical, ``width`` px wide, with brightness
    varying around ``brightness``."""
    height, width_px = shape
    drops = (rng.random(shape) < density).astype(np.float32)
    drops *= rng.uniform(0.5, 1.0, size=shape).astype(np.float32) * brightness
    kernel = _streak_kernel(length, angle, width)
    layer = _convolve(drops[..., None], kernel)[..., 0]
    return np.clip(layer, 0.0, 1.0)


def add_rain(image: np.ndarray, rng: np.random.Generator, layers: int | None = None,
             haze: float | None = None) -> np.ndarray:
    """Synthetic rain, quantised to 8 bits.

    One to three streak layers (``layers``), sharing a wind direction (angle from vertical
    uniform in [-40, 40] degrees) with per-layer jitter of up to 8 degrees, so near and far rain
    differ: each layer draws its density (log-uniform in [0.0008, 0.02] drops per pixel), length
    (5 to 45 px), width (0.5 to 3 px) and brightness (0.35 to 1.0). The streaks are blended onto
    the photo either by addition or by screen blending (chosen at random), both clipped to [0, 1],
    and a faint veil of haze (``haze``; up to 0.15 of the way towards a light grey, applied half
    the time) is mixed in, since heavy rain also lowers contrast.
    """
    clean = _to_float(image)
    shape = clean.shape[:2]
    layers = int(rng.integers(1, 4)) if layers is None else int(layers)
    wind = np.deg2rad(rng.uniform(-40.0, 40.0))
    streaks = np.zeros(shape, np.float32)
    for _ in range(layers):
        layer = rain_layer(shape, rng,
                           density=float(np.exp(rng.uniform(np.log(8e-4), np.log(2e-2)))),
                           length=float(rng.uniform(5.0, 45.0)),
                           angle=float(wind + np.deg2rad(rng.uniform(-8.0, 8.0))),
                           width=float(rng.uniform(0.5, 3.0)),
                           brightness=float(rng.uniform(0.35, 1.0)))
        streaks = 1.0 - (1.0 - streaks) * (1.0 - layer)
    # Rain is nearly colourless but picks up a slight tint from the scene's light.
    tint = rng.uniform(0.9, 1.0, size=3).astype(np.float32)
    streaks3 = streaks[..., None] * tint
    if rng.random() < 0.5:
        rainy = clean + streaks3
    else:
        rainy = 1.0 - (1.0 - clean) * (1.0 - streaks3)
    if haze is None:
        haze = float(rng.uniform(0.0, 0.15)) if rng.random() < 0.5 else 0.0
    if haze > 0:
        airlight = np.float32(rng.uniform(0.7, 0.95))
        rainy = (1.0 - haze) * rainy + haze * airlight
    return _from_float(np.clip(rainy, 0.0, 1.0), image)


DEGRADATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "deblurring": blur,
    "denoising": add_noise,
    "deraining": add_rain,
}


def degrade(task: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The training degradation of ``task`` applied to ``image``."""
    try:
        return DEGRADATIONS[task](image, rng)
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(DEGRADATIONS)}") from None
