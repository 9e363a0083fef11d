"""Rain assembled from independently drawn parts.

Every other rain family fixes most of what rain looks like (a streak kernel, one blend, one
colour) and varies the rest, so a derainer trained on them learns those families: the tenth
session's depth rain lifted the held-out family that shares its physics and no other. Here each
trait is drawn on its own, from every choice the project knows of, so that no combination is
the lesson: the streak's path (straight, bent by a gust, wavering), its brightness along the path
(tapered, blunt, brightest mid-way, brightest at one end, flickering), its width and softness,
its colour (light, the photo's sky, the scene seen through the drop) and how it meets the photo
(added, screen, lighten, opaque, added in linear light, darkening), then haze, sensor noise and
JPEG. The streaks are splatted point by point along their paths, not drawn by a line renderer or
a streak kernel, so none of the held-out families' renderers is learnt either.

Kept inside the other families' ranges on purpose: within 40 degrees of vertical, at most 45 px
long and 2 % of pixels starting a drop, so that the evaluation's slanted, long and downpour rows
stay held out.
"""

from __future__ import annotations

import numpy as np

from .camera import from_float, gaussian_filter, jpeg, log_uniform, resize_plane, splat, to_float

WIND_DEGREES = 40.0
LENGTH = (4.0, 45.0)
DENSITY = (8e-4, 2e-2)
WIDTH = (0.5, 3.5)


def _profile(rng: np.random.Generator, t: np.ndarray, count: int) -> np.ndarray:
    """Brightness along each of ``count`` streaks at positions ``t`` in [0, 1]: (count, len(t))."""
    kind = rng.integers(5)
    if kind == 0:  # tapered to blunt ends
        along = np.sin(np.pi * t) ** rng.uniform(0.0, 2.0) + 0.05
    elif kind == 1:  # brightest mid-way, fading to nothing
        along = np.exp(-0.5 * ((t - 0.5) / rng.uniform(0.12, 0.5)) ** 2)
    elif kind == 2:  # even
        along = np.ones_like(t)
    elif kind == 3:  # a bright head and a fading tail, either way round
        along = (t if rng.random() < 0.5 else 1.0 - t) ** rng.uniform(0.3, 2.0)
    else:  # flickering: drops break up as they fall
        along = np.sin(np.pi * t) ** 0.5
        flicker = rng.uniform(0.2, 1.0, size=(count, 6))
        cells = np.linspace(0.0, 1.0, 6)
        return along * np.stack([np.interp(t, cells, row) for row in flicker])
    return np.broadcast_to(along, (count, len(t)))


def _paths(rng: np.random.Generator, count: int, length: np.ndarray, angle: np.ndarray, shape: tuple[int, int],
           t: np.ndarray) -> np.ndarray:
    """Points along ``count`` streak paths: (count, len(t), 2) as (row, column)."""
    height, width = shape
    direction = np.stack([np.cos(angle), np.sin(angle)], axis=1)   # rows grow downwards: rain falls
    across = np.stack([-direction[:, 1], direction[:, 0]], axis=1)
    start = np.stack([rng.uniform(-length, height), rng.uniform(-length, width)], axis=1)
    along = t[None, :, None] * length[:, None, None] * direction[:, None, :]
    kind = rng.integers(3)
    if kind == 0:
        sideways = np.zeros((count, len(t)))
    elif kind == 1:  # bent by a gust, all the same way or each its own
        side = np.sign(rng.uniform(-1, 1)) if rng.random() < 0.7 else np.sign(rng.uniform(-1, 1, size=(count, 1)))
        sideways = side * rng.uniform(0.02, 0.15, size=(count, 1)) * length[:, None] * 4 * t * (1 - t)
    else:  # wavering
        amplitude = rng.uniform(0.3, 1.5, size=(count, 1))
        cycles = rng.uniform(0.5, 2.0, size=(count, 1))
        sideways = amplitude * np.sin(2 * np.pi * (cycles * t + rng.random((count, 1))))
    return start[:, None, :] + along + sideways[..., None] * across[:, None, :]


def streak_layer(shape: tuple[int, int], rng: np.random.Generator, wind: float) -> np.ndarray:
    """One depth layer of streaks, an HxW map in [0, 1]."""
    height, width = shape
    layer_length = rng.uniform(*LENGTH)
    count = int(rng.poisson(float(log_uniform(rng, *DENSITY)) * (height + layer_length) * (width + layer_length)))
    if count == 0:
        return np.zeros(shape, np.float32)
    length = np.clip(layer_length * rng.uniform(0.7, 1.3, size=count), LENGTH[0], LENGTH[1])
    angle = np.deg2rad(wind + rng.uniform(-8.0, 8.0) + rng.normal(0.0, rng.uniform(0.0, 4.0), size=count))
    angle = np.clip(angle, -np.deg2rad(WIND_DEGREES), np.deg2rad(WIND_DEGREES))
    t = np.linspace(0.0, 1.0, int(np.ceil(LENGTH[1] * 2)) + 1)
    points = _paths(rng, count, length, angle, shape, t)
    level = float(log_uniform(rng, 0.08, 1.0)) * rng.uniform(0.4, 1.0, size=(count, 1))
    sigma = max(rng.uniform(*WIDTH) / 2, 0.4)
    # Weighted by the spacing of the points, so that a streak's brightness does not depend on its
    # length, and by the spread of the blur across it, so that its peak is about ``level``.
    spacing = (length / (len(t) - 1))[:, None]
    weights = level * _profile(rng, t, count) * spacing * np.sqrt(2 * np.pi) * sigma
    # The paths are (row, column); splat takes (x, y).
    streaks = gaussian_filter(splat(points.reshape(-1, 2)[:, ::-1], shape, weights.reshape(-1)).astype(np.float32),
                              sigma)
    if rng.random() < 0.25:  # a near layer, out of focus
        soft = float(rng.uniform(1.0, 3.0))
        streaks = gaussian_filter(streaks, soft) * np.float32(1.0 + soft / 2)
    return np.clip(streaks, 0.0, 1.0)


def _streak_colour(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light, the photo's brightest tenth (its sky), or the scene seen through a drop."""
    pick = rng.random()
    if pick < 0.5:
        return (rng.uniform(0.8, 1.0) * rng.uniform(0.88, 1.0, size=3)).astype(np.float32)
    if pick < 0.75:
        brightness = clean.mean(axis=2)
        sky = clean[brightness >= np.quantile(brightness, 0.9)].mean(axis=0)
        return np.clip(sky * rng.uniform(1.0, 1.2), 0.0, 1.0).astype(np.float32)
    shift = tuple(int(s) for s in rng.integers(-12, 13, size=2))
    seen = gaussian_filter(np.roll(clean, shift, axis=(0, 1)), float(rng.uniform(1.0, 5.0)))
    return np.clip(seen * rng.uniform(1.0, 1.5) + rng.uniform(0.0, 0.25), 0.0, 1.0).astype(np.float32)


def _blend(clean: np.ndarray, streaks: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pick = rng.random()
    lit = streaks * colour
    if pick < 0.2:
        return clean + lit
    if pick < 0.4:
        return 1.0 - (1.0 - clean) * (1.0 - lit)
    if pick < 0.55:
        return np.maximum(clean, lit)
    if pick < 0.75:  # opaque drops
        alpha = streaks * np.float32(rng.uniform(0.3, 1.0))
        return clean * (1.0 - alpha) + colour * alpha
    if pick < 0.9:  # light adds up in linear light, so streaks vanish over bright parts
        gamma = np.float32(rng.uniform(2.0, 2.4))
        return np.clip(clean ** gamma + lit, 0.0, 1.0) ** (1.0 / gamma)
    return clean * (1.0 - streaks * np.float32(rng.uniform(0.3, 0.8)))  # drops against a bright sky


def randomized_rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One to three layers of streaks with every trait drawn independently (module docstring),
    blended onto ``image``, then maybe haze, sensor noise and JPEG; quantised to 8 bits."""
    clean = to_float(image)
    shape = clean.shape[:2]
    wind = rng.uniform(-WIND_DEGREES, WIND_DEGREES)
    streaks = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        streaks = 1.0 - (1.0 - streaks) * (1.0 - streak_layer(shape, rng, wind))
    rainy = _blend(clean, streaks[..., None], _streak_colour(clean, rng), rng)
    if rng.random() < 0.4:
        veil = rng.uniform(0.0, 0.3)
        if rng.random() < 0.5:  # mist gathers thicker in places
            cells = rng.random((int(rng.integers(2, 6)), int(rng.integers(2, 6)))).astype(np.float32)
            veil = veil * np.clip(resize_plane(cells, shape), 0.0, 1.0)[..., None]
        rainy = (1.0 - veil) * rainy + veil * np.float32(rng.uniform(0.6, 0.95))
    if rng.random() < 0.2:
        rainy = rainy + rng.normal(0.0, rng.uniform(0.0, 3.0) / 255.0, size=rainy.shape)
    rainy = np.clip(rainy, 0.0, 1.0).astype(np.float32)
    if rng.random() < 0.4:
        rainy = jpeg(rainy, int(rng.integers(50, 96)))
    return from_float(rainy, image)
