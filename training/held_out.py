"""The evaluation's held-out degradations: families and ranges no training mixture draws.

Each row of the model card marked "held out" comes from here, so that a generator the networks
are measured on cannot drift into a training mixture unnoticed: :mod:`training.degradations` and
:mod:`training.randomized_rain` never import this module (a test checks it), and every family
says what about it training has not seen. (Randomized rain, ``--mixture randomized``, does draw
the blends, profiles and colours of the gusty, drawn and refracting families, though not their
renderers; :mod:`training.evaluate` labels those rows "partly" seen for weights trained on it.)
Each function takes a uint8 RGB photo and a numpy
Generator and returns the degraded photo, same size and dtype.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from .camera import GAMMA, CameraRanges, from_float, gaussian_filter, jpeg, to_float, with_settings
from .degradations import (
    RainRanges,
    add_noise,
    convolve,
    luma,
    motion_kernel,
    partly_shared_noise,
    smeared_rain,
)


def coloured_noise(image: np.ndarray, rng: np.random.Generator, sigma: tuple[float, float] = (10.0, 25.0),
                   correlation: tuple[float, float] = (0.7, 1.5)) -> np.ndarray:
    """Held-out noise family: white Gaussian noise low-pass filtered (Gaussian of ``correlation``
    px) and rescaled to a standard deviation in ``sigma``, partly shared between the channels:
    grain coarser than a pixel from no camera model at all (no mosaic, no tone curve)."""
    clean = to_float(image)
    white = partly_shared_noise(clean.shape, rng.uniform(0.0, 0.7), rng)
    grain = gaussian_filter(white, float(rng.uniform(*correlation)))
    grain *= np.float32(rng.uniform(*sigma) / 255.0) / max(float(grain.std()), 1e-8)
    return from_float(clean + grain, image)


def noisy_jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out: white noise (sigma 10-20) saved as a low-quality JPEG (quality 15-35; the camera
    family trains on 40-95): the noise survives as 8x8-block and 2x2-chroma blotches."""
    noisy = add_noise(image, rng, sigma=float(rng.uniform(10.0, 20.0)))
    return (jpeg(noisy.astype(np.float32) / 255.0, int(rng.integers(15, 36))) * 255.0).round().astype(np.uint8)


def film_grain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out noise family, as on a scanned film photo: grain mostly shared by the three channels
    (85 % of its variance), correlated by a 2-4 px box (grain clumps, not a Gaussian or a camera's
    demosaic), strongest in the mid-tones (standard deviation 4-9 % of full scale there, 1 % floor),
    then saved as a JPEG of quality 70-89."""
    clean = to_float(image)
    brightness = luma(clean)
    clump = int(rng.integers(2, 5))
    box = np.full((clump, clump), 1.0 / clump ** 2, np.float32)
    grain = convolve(partly_shared_noise(clean.shape, 0.85, rng), box)
    grain /= max(float(grain.std()), 1e-8)
    strength = np.float32(rng.uniform(0.04, 0.09)) * (4 * brightness * (1 - brightness))[..., None] + np.float32(0.01)
    noisy = np.clip(clean + grain * strength, 0.0, 1.0)
    return from_float(jpeg(noisy, int(rng.integers(70, 90))), image)


def banded_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out noise family, as in a dark photo brightened afterwards: per-pixel noise (sigma
    4-10, 30 % shared by the channels) plus a random offset per sensor row (sigma 2-6, 70 %
    shared) and, a third of the time, a weaker one per column (the readout's banding), all up to
    twice as strong in the shadows, then JPEG 75-92. Nothing in training makes lines of noise."""
    clean = to_float(image)
    height, width = clean.shape[:2]
    noise = partly_shared_noise(clean.shape, 0.3, rng) * np.float32(rng.uniform(4.0, 10.0) / 255.0)
    noise += partly_shared_noise((height, 1, 3), 0.7, rng) * np.float32(rng.uniform(2.0, 6.0) / 255.0)
    if rng.random() < 1 / 3:
        noise += partly_shared_noise((1, width, 3), 0.7, rng) * np.float32(rng.uniform(1.0, 3.0) / 255.0)
    shadows = (1.0 - luma(clean)[..., None]) ** 2
    noisy = np.clip(clean + noise * (1.0 + shadows), 0.0, 1.0)
    return from_float(jpeg(noisy, int(rng.integers(75, 93))), image)


def refracted_rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out rain family, unlike every streak the training mixtures draw: thresholded noise
    (each drop a soft blob, 2-8 % of pixels) smeared by a box-shaped linear motion of 20-60 px
    within 30 degrees of vertical, so streaks have even brightness and blunt ends instead of
    tapered ones, stretched by a levels curve; composited not as added light but as drops that
    refract the scene: each streak pixel shows a blurred, brightened copy of its surroundings, at
    an opacity of 0.4-0.8, so it stands out only where the scene behind it is darker."""
    clean = to_float(image)
    height, width = clean.shape[:2]
    density = float(np.exp(rng.uniform(np.log(0.02), np.log(0.08))))
    drops = gaussian_filter((rng.random((height, width, 1)) < density).astype(np.float32),
                            float(rng.uniform(0.4, 1.2)))
    length = float(rng.uniform(20.0, 60.0))
    # motion_kernel measures its angle from the horizontal.
    line = motion_kernel(rng, size=int(np.ceil(length)) + 3 | 1, length=length,
                         angle=np.pi / 2 + np.deg2rad(rng.uniform(-30.0, 30.0)))
    smeared = convolve(drops, line)[..., 0]
    low, high = np.percentile(smeared, [50.0, 99.0])
    streaks = np.clip((smeared - low) / max(float(high - low), 1e-6), 0.0, 1.0)[..., None]
    behind = np.clip(gaussian_filter(clean, float(rng.uniform(3.0, 8.0))) * rng.uniform(1.1, 1.4)
                     + rng.uniform(0.05, 0.15), 0.0, 1.0)
    alpha = streaks * np.float32(rng.uniform(0.4, 0.8))
    return from_float(clean * (1 - alpha) + behind * alpha, image)


def _supersampled(shape: tuple[int, int], scale: int, draw_on: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """What ``draw_on`` draws on a black canvas ``scale`` times the size of ``shape``, reduced by
    averaging: PIL's lines are not anti-aliased, so this is. An HxW map in [0, 1]."""
    height, width = shape
    canvas = Image.new("L", (width * scale, height * scale))
    draw_on(ImageDraw.Draw(canvas))
    return np.asarray(canvas.resize((width, height), Image.BOX), np.float32) / 255.0


def _drawn_streaks(shape: tuple[int, int], rng: np.random.Generator, count: int, thickness: tuple[float, float],
                   length: tuple[float, float], wind: float) -> np.ndarray:
    """Straight lines drawn with PIL at 3x resolution and reduced: an HxW map in [0, 1]."""
    height, width = shape
    scale = 3

    def lines(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(count):
            angle = wind + np.deg2rad(rng.uniform(-3.0, 3.0))
            half = rng.uniform(*length) * (scale / 2)
            x, y = rng.uniform(0, width * scale), rng.uniform(0, height * scale)
            dx, dy = half * np.sin(angle), half * np.cos(angle)
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=int(rng.integers(128, 256)),
                      width=max(1, int(round(rng.uniform(*thickness) * scale))))

    return _supersampled(shape, scale, lines)


def drawn_rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out rain family, drawn as another renderer would: straight lines of even width and flat
    ends (no streak kernel, no drops), in two depth layers, far (many thin 8-25 px lines) and near
    (few 3-6 px lines of 30-80 px, out of focus), within 25 degrees of vertical, added in linear
    light (so streaks stand out over dark parts and vanish over bright ones), bluish, then JPEG
    80-95."""
    clean = to_float(image)
    shape = clean.shape[:2]
    wind = np.deg2rad(rng.uniform(-25.0, 25.0))
    far = _drawn_streaks(shape, rng, int(shape[0] * shape[1] * rng.uniform(2e-3, 6e-3)), (0.6, 1.2), (8.0, 25.0), wind)
    near = gaussian_filter(_drawn_streaks(shape, rng, int(shape[0] * shape[1] * rng.uniform(1e-4, 5e-4)),
                                          (3.0, 6.0), (30.0, 80.0), wind), float(rng.uniform(1.5, 3.0)))
    light = far * rng.uniform(0.15, 0.5) + near * rng.uniform(0.1, 0.3)
    linear = clean ** GAMMA + light[..., None] * np.array([0.9, 0.95, 1.0], np.float32)
    rainy = np.clip(linear, 0.0, 1.0) ** (1 / GAMMA)
    return from_float(jpeg(rainy, int(rng.integers(80, 96))), image)


def gusty_rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out rain family, written in the tenth session before its derainers were measured:
    streaks bent by gusts (each a quadratic curve whose middle is pushed sideways by 3-12 % of
    its 15-50 px length), brightest mid-way and fading to nothing at both ends (a Gaussian
    profile along the path, not a taper of width), 1-2.5 px wide, 0.1-0.5 % of pixels starting
    one; composited with a *lighten* blend (each pixel the brighter of the scene and the streak,
    whose colour is a tenth brighter than the mean of the photo's brightest tenth: its sky where
    it has one, else its brightest things, so some photos get tinted rain), then JPEG 70-90. No
    training family bends a streak or blends by the maximum."""
    clean = to_float(image)
    height, width = clean.shape[:2]
    scale = 2
    wind = np.deg2rad(rng.uniform(-30.0, 30.0))
    bend_side = 1.0 if rng.random() < 0.5 else -1.0  # one gust bends every streak the same way
    steps = np.linspace(0.0, 1.0, 13)

    def curves(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(int(height * width * rng.uniform(1e-3, 5e-3))):
            length = rng.uniform(15.0, 50.0) * scale
            angle = wind + np.deg2rad(rng.uniform(-5.0, 5.0))
            direction = np.array([np.sin(angle), np.cos(angle)])
            across = np.array([direction[1], -direction[0]])
            start = np.array([rng.uniform(0, width * scale), rng.uniform(0, height * scale)])
            bend = bend_side * rng.uniform(0.03, 0.12) * length
            # A quadratic Bezier curve through start, a middle pushed sideways, and the end.
            control = start + direction * length / 2 + across * 2 * bend
            end = start + direction * length
            points = ((1 - steps)[:, None] ** 2 * start + 2 * ((1 - steps) * steps)[:, None] * control
                      + steps[:, None] ** 2 * end)
            peak = rng.uniform(0.5, 1.0) * 255
            stroke = max(1, int(round(rng.uniform(1.0, 2.5) * scale)))
            for (a, b), t in zip(zip(points[:-1], points[1:]), (steps[:-1] + steps[1:]) / 2):
                level = peak * np.exp(-0.5 * ((t - 0.5) / 0.2) ** 2)
                draw.line([tuple(a), tuple(b)], fill=int(level), width=stroke)

    streaks = _supersampled((height, width), scale, curves)[..., None]
    brightness = clean.mean(axis=2)
    sky = clean[brightness >= np.quantile(brightness, 0.9)].mean(axis=0)
    rainy = np.maximum(clean, streaks * np.clip(sky * 1.1, 0.0, 1.0))
    return from_float(jpeg(rainy, int(rng.integers(70, 91))), image)


# Held-out parameter ranges of the realistic families (training's are the dataclasses' defaults).
# Coarse grain: made at a third of the size and enlarged (training spreads it up to 2.5x), strong.
COARSE_GRAIN = with_settings(CameraRanges(), resize_chances=(1.0, 0.0), spread=(2.6, 3.5), shot=(4e-3, 2e-2),
                             jpeg_chance=0.0)
# High ISO: more shot noise than training ever drew (its maximum is 1.2e-2), chroma smoothed, a
# good JPEG; at the photo's own size, so the finest wavelet band sees it (the no-reference figure
# barely registers noise spread over several pixels, as on the coarse-grain row).
HIGH_ISO = with_settings(CameraRanges(), shot=(1.2e-2, 3e-2), resize_chances=(0.0, 0.0), chroma_smooth_chance=1.0,
                         jpeg_chance=1.0, jpeg_quality=(80.0, 92.0))
DOWNPOUR = RainRanges(density=(2.5e-2, 6e-2), length=(3.0, 12.0), width=(0.5, 1.5), mist=(0.3, 0.45))
SLANTED = RainRanges(wind_degrees=(45.0, 65.0), length=(50.0, 90.0), width=(1.0, 3.0))


def slanted_rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ranges = SLANTED if rng.random() < 0.5 else RainRanges(**{**SLANTED.__dict__, "wind_degrees": (-65.0, -45.0)})
    return smeared_rain(image, rng, ranges)


def _overlay(base: np.ndarray, blend: np.ndarray) -> np.ndarray:
    """The overlay blend mode: multiplies the dark half of ``base`` by ``2 * blend`` and screens
    the bright half, so a light streak brightens dark parts in proportion to their brightness."""
    return np.where(base < 0.5, 2 * base * blend, 1 - 2 * (1 - base) * (1 - blend))


def perspective_rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out rain family, written in the thirteenth session before its derainer was measured:
    rain falling towards the camera, seen in perspective. Every streak points away from one
    vanishing point above the frame (0.5-3 frame heights up), so streaks fan out across the
    photo instead of sharing a wind; each is a wedge (drawn as a PIL polygon at 4x and reduced),
    pointed at its far end and 1-4 px wide at its near end, as long as 4-10 % of its distance
    from the vanishing point (6-60 px); composited by the *overlay* blend (brightening dark
    parts in proportion to their brightness, screening bright ones), then JPEG 75-92. Training
    draws parallel streaks of even or tapered width and never blends by overlay."""
    clean = to_float(image)
    height, width = clean.shape[:2]
    scale = 4
    vanishing = np.array([-rng.uniform(0.5, 3.0) * height, rng.uniform(0.2, 0.8) * width])
    stretch = rng.uniform(0.04, 0.10)

    def wedges(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(int(height * width * rng.uniform(1e-3, 4e-3))):
            near = np.array([rng.uniform(0, height + 30), rng.uniform(0, width)])
            away = near - vanishing
            distance = float(np.hypot(*away))
            along = away / distance
            length = float(np.clip(stretch * distance, 6.0, 60.0))
            far = near - along * length
            across = np.array([along[1], -along[0]]) * rng.uniform(0.5, 2.0)
            corners = [far, near + across, near - across]
            draw.polygon([(c[1] * scale, c[0] * scale) for c in corners], fill=int(rng.integers(120, 256)))

    streaks = _supersampled((height, width), scale, wedges)[..., None]
    rainy = _overlay(clean, 0.5 + 0.5 * streaks * np.float32(rng.uniform(0.6, 1.0)))
    return from_float(jpeg(np.clip(rainy, 0.0, 1.0), int(rng.integers(75, 93))), image)


def sheet_rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out rain family, written in the thirteenth session before its derainer was measured:
    sheets of rain with no drops at all. White noise is filtered in the Fourier domain to one
    orientation (within 30 degrees of vertical, an angular spread of 2-6 degrees) and one band of
    widths (2-6 px across), so it becomes a texture of long, wavering, broken streaks; its bright
    part, sparsified by a power of 1-2, at 30-60 % strength, is composited by *colour dodge* (dividing the scene by
    ``1 - streak``, so the rain shows most over bright parts, the opposite of light added in
    linear light), then JPEG 60-90. No training family makes streaks from filtered noise or
    blends by dodging."""
    clean = to_float(image)
    height, width = clean.shape[:2]
    rows = np.fft.fftfreq(height)[:, None]
    cols = np.fft.fftfreq(width)[None, :]
    radius = np.hypot(rows, cols) + 1e-9
    # Streaks within theta of vertical have their energy along the horizontal frequency axis.
    theta = np.deg2rad(rng.uniform(-30.0, 30.0))
    orientation = np.arctan2(rows, cols) - theta
    off_axis = np.abs(np.sin(orientation))
    spread = np.sin(np.deg2rad(rng.uniform(2.0, 6.0)))
    across = 1.0 / rng.uniform(2.0, 6.0)  # the frequency of a streak's width
    passband = np.exp(-0.5 * (off_axis / spread) ** 2) * np.exp(-0.5 * (np.log(radius / (across / 2)) / 0.6) ** 2)
    texture = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((height, width))) * passband))
    texture = np.clip(texture / max(float(np.percentile(texture, 99.0)), 1e-9), 0.0, 1.0) ** rng.uniform(1.0, 2.0)
    streaks = (texture * rng.uniform(0.3, 0.6)).astype(np.float32)[..., None]
    rainy = clean / np.maximum(1.0 - streaks, 1e-3)
    return from_float(jpeg(np.clip(rainy, 0.0, 1.0), int(rng.integers(60, 91))), image)


def camera_roll(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out blur family, written in the fourteenth session: the camera rolls about its optical
    axis during the exposure, 1-3 degrees about a pivot up to a fifth of the frame from the
    centre. The blur is then an arc whose length grows with the distance from the pivot. There is
    none at the pivot, and about 12 px at the corner of a 500 px photo at 2 degrees. Every
    training kernel is the same all over the frame; this blur is different at every pixel.
    The exposure is summed in linear light (gamma 2.2) over 25 evenly spaced angles, then
    recorded with sensor noise (sigma 1-3) and JPEG 70-90."""
    clean = to_float(image)
    height, width = clean.shape[:2]
    sweep = rng.uniform(1.0, 3.0)
    pivot = (width / 2 + rng.uniform(-0.2, 0.2) * width, height / 2 + rng.uniform(-0.2, 0.2) * height)
    # Mirrored margins wide enough that no rotated corner brings in empty canvas.
    margin = int(np.ceil(np.hypot(height, width) * np.deg2rad(sweep) / 2)) + 2
    linear = np.pad(clean ** GAMMA, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    centre = (pivot[0] + margin, pivot[1] + margin)
    planes = [Image.fromarray(np.ascontiguousarray(linear[..., channel])) for channel in range(3)]
    exposure = np.zeros_like(linear)
    angles = np.linspace(-sweep / 2, sweep / 2, 25)
    for angle in angles:
        for channel, plane in enumerate(planes):
            exposure[..., channel] += np.asarray(plane.rotate(float(angle), Image.BILINEAR, center=centre))
    blurred = (exposure[margin:margin + height, margin:margin + width] / len(angles)) ** (1 / GAMMA)
    blurred = blurred + np.float32(rng.uniform(1.0, 3.0) / 255.0) * rng.standard_normal(blurred.shape, np.float32)
    return from_float(jpeg(np.clip(blurred, 0.0, 1.0), int(rng.integers(70, 91))), image)


def camera_zoom(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held-out blur family, written in the twenty-fifth session: the camera moves along its axis
    (or the lens zooms) during the exposure, so the photo grows by 1.5-4 % about a point up to 15 %
    of the frame from the centre. Every point smears along the line to that point, by nothing
    there and about 7 px at the corner of a 500 px photo at 2 %. The exposure is summed in linear
    light over 21 scales centred on 1 (the middle of the exposure is the sharp photo), then
    recorded with sensor noise (sigma 1-3) and JPEG 70-90."""
    clean = to_float(image)
    height, width = clean.shape[:2]
    growth = rng.uniform(0.015, 0.04)
    centre_x = width / 2 + rng.uniform(-0.15, 0.15) * width
    centre_y = height / 2 + rng.uniform(-0.15, 0.15) * height
    # Shrinking the frame reaches up to growth/2 of its size beyond the edge: mirror that much in.
    margin = int(np.ceil(max(height, width) * growth)) + 2
    linear = np.pad(clean ** GAMMA, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    centre_x, centre_y = centre_x + margin, centre_y + margin
    planes = [Image.fromarray(np.ascontiguousarray(linear[..., channel])) for channel in range(3)]
    exposure = np.zeros_like(linear)
    scales = np.linspace(1.0 - growth / 2, 1.0 + growth / 2, 21)
    for scale in scales:
        # PIL's affine maps each output pixel to the input point it samples: centre + offset / scale.
        inverse = 1.0 / scale
        mapping = (inverse, 0.0, centre_x * (1 - inverse), 0.0, inverse, centre_y * (1 - inverse))
        for channel, plane in enumerate(planes):
            exposure[..., channel] += np.asarray(plane.transform(plane.size, Image.AFFINE, mapping, Image.BILINEAR))
    blurred = (exposure[margin:margin + height, margin:margin + width] / len(scales)) ** (1 / GAMMA)
    blurred = blurred + np.float32(rng.uniform(1.0, 3.0) / 255.0) * rng.standard_normal(blurred.shape, np.float32)
    return from_float(jpeg(np.clip(blurred, 0.0, 1.0), int(rng.integers(70, 91))), image)
