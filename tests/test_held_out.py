"""The held-out families written since the thirteenth session do what their docstrings say: their
traits are the reason they are held out, so a change that loses a trait must fail here."""

from __future__ import annotations

import numpy as np
import pytest

from training import held_out


def _halves(left: int, right: int, size: int = 128) -> np.ndarray:
    photo = np.full((size, size, 3), left, np.uint8)
    photo[:, size // 2:] = right
    return photo


def _lean(lift: np.ndarray) -> float:
    """The dominant orientation of a streak map in degrees (structure tensor), 0 for horizontal
    gradients, i.e. upright streaks."""
    gy, gx = np.gradient(lift)
    return float(np.degrees(0.5 * np.arctan2(2 * (gx * gy).sum(), (gx ** 2 - gy ** 2).sum())))


def test_perspective_rain_blends_by_overlay_so_black_stays_black():
    photo = _halves(0, 100)
    rainy = held_out.perspective_rain(photo, np.random.default_rng(1))
    assert np.array_equal(rainy, held_out.perspective_rain(photo, np.random.default_rng(1)))
    lift = rainy.astype(float) - photo
    assert np.abs(lift[:, 4:60]).mean() < 1.0           # overlay multiplies the dark half: 0 stays 0
    assert 0.02 < (lift[:, 68:124].max(axis=2) > 10).mean() < 0.6


def test_perspective_rain_fans_out_from_its_vanishing_point():
    # Streaks left of the vanishing point lean one way, those right of it the other; every
    # training family's streaks share one wind.
    spreads = []
    for seed in range(6):
        photo = np.full((192, 384, 3), 100, np.uint8)
        lift = held_out.perspective_rain(photo, np.random.default_rng(seed)).astype(float).mean(axis=2) - 100
        spreads.append(_lean(lift[:, :64]) - _lean(lift[:, -64:]))
    assert min(np.abs(spreads)) > 2
    assert len({np.sign(s) for s in spreads}) == 1


def test_sheet_rain_dodges_so_it_shows_most_over_bright_parts():
    photo = _halves(40, 200)
    rainy = held_out.sheet_rain(photo, np.random.default_rng(2))
    assert np.array_equal(rainy, held_out.sheet_rain(photo, np.random.default_rng(2)))
    lift = rainy.astype(float) - photo
    dark, bright = lift[:, 8:56].mean(), lift[:, 72:120].mean()
    assert bright > 3 * dark > 0
    black = held_out.sheet_rain(_halves(0, 0), np.random.default_rng(2))
    assert black.max() <= 3   # dividing black by anything leaves it black (JPEG's rounding aside)


def test_sheet_rain_streaks_are_long_and_upright_without_drops():
    lean = []
    for seed in range(6):
        photo = np.full((192, 192, 3), 160, np.uint8)
        lift = held_out.sheet_rain(photo, np.random.default_rng(seed)).astype(float).mean(axis=2) - 160
        lean.append(abs(_lean(lift)))
    # Drawn within 30 degrees of vertical; the structure tensor of the dodged, quantised texture
    # reads up to about 6 degrees steeper than the filter's centre (measured: 26.6 -> 32.2).
    assert max(lean) <= 36 and min(lean) < 10


def _detail_kept(clean: np.ndarray, degraded: np.ndarray) -> float:
    """How much of a patch's fine detail survives: correlation of the two patches' horizontal and
    vertical differences (1 sharp, near 0 blurred away)."""
    def detail(image):
        grey = image.astype(np.float64).mean(axis=2)
        return np.concatenate((np.diff(grey, axis=0).ravel(), np.diff(grey, axis=1).ravel()))
    a, b = detail(clean), detail(degraded)
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("camera", [held_out.camera_roll, held_out.camera_zoom])
def test_a_turning_or_zooming_camera_blurs_the_corners_and_spares_the_middle(camera):
    # Random 2 px blocks show blur of a pixel or two and survive JPEG. The pivot (or the zoom's
    # centre) is within a fifth of the frame of the centre, so the middle is always much nearer to
    # it than the corners are; a blur that is the same everywhere keeps as much detail in both.
    blocks = np.random.default_rng(0).integers(0, 256, (200, 200, 1), dtype=np.uint8)
    texture = blocks.repeat(2, axis=0).repeat(2, axis=1).repeat(3, axis=2)
    for seed in range(6):
        blurred = camera(texture, np.random.default_rng(seed))
        middle = _detail_kept(texture[180:220, 180:220], blurred[180:220, 180:220])
        corners = [_detail_kept(texture[rows, cols], blurred[rows, cols])
                   for rows in (slice(0, 40), slice(360, 400)) for cols in (slice(0, 40), slice(360, 400))]
        assert middle > max(corners) + 0.15, (seed, middle, corners)


def test_camera_roll_brings_in_no_empty_canvas():
    # A rotated frame uncovers its corners; the mirrored margin must fill them with the scene.
    grey = np.full((160, 240, 3), 128, np.uint8)
    for seed in range(4):
        rolled = held_out.camera_roll(grey, np.random.default_rng(seed)).astype(float)
        assert abs(rolled.mean() - 128) < 1 and rolled[:4].mean() > 120 and rolled[-4:, -4:].mean() > 120


def test_camera_zoom_brings_in_no_empty_canvas():
    # The frames shrunk below 1 reach past the photo's edge; the mirrored margin must fill them.
    grey = np.full((160, 240, 3), 128, np.uint8)
    for seed in range(4):
        zoomed = held_out.camera_zoom(grey, np.random.default_rng(seed)).astype(float)
        assert abs(zoomed.mean() - 128) < 1 and zoomed[:3].mean() > 124 and zoomed[:, -3:].mean() > 124
