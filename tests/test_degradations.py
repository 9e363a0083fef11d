"""The synthetic degradations: seeded, shape- and dtype-preserving, and actually degrading."""

from __future__ import annotations

import numpy as np
import pytest

from training import degradations as deg
from training.degradations import DEGRADATIONS


def _photo(height: int = 96, width: int = 128) -> np.ndarray:
    """A smooth colour scene with edges: blur and rain must visibly change it."""
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = np.stack([0.5 + 0.4 * np.sin(6 * xx + 2 * yy), 0.5 + 0.3 * np.cos(5 * yy), 0.3 + 0.4 * xx], axis=-1)
    image[height // 3:2 * height // 3, width // 4:width // 2] = 0.1  # a dark block with sharp edges
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


@pytest.mark.parametrize("task", sorted(DEGRADATIONS))
def test_deterministic_for_a_seed(task):
    photo = _photo()
    first = DEGRADATIONS[task](photo, np.random.default_rng(7))
    again = DEGRADATIONS[task](photo, np.random.default_rng(7))
    other = DEGRADATIONS[task](photo, np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("task", sorted(DEGRADATIONS))
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_keeps_size_and_dtype(task, dtype):
    photo = _photo(72, 50)
    image = photo if dtype == np.uint8 else (photo / 255.0).astype(dtype)
    out = DEGRADATIONS[task](image, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == image.dtype
    if dtype != np.uint8:
        assert out.min() >= 0 and out.max() <= 1
        # Quantised to 8-bit levels, as a saved file would be.
        assert np.allclose(out * 255, np.rint(out * 255), atol=1e-4)


@pytest.mark.parametrize("task", sorted(DEGRADATIONS))
def test_degrades(task):
    photo = _photo()
    values = [_psnr(DEGRADATIONS[task](photo, np.random.default_rng(seed)), photo) for seed in range(12)]
    # Each draw changes the photo, and typical draws clearly (a sigma near 0 may barely).
    assert max(values) < 60 and np.median(values) < 35


def test_noise_strength_follows_sigma():
    flat = np.full((128, 128, 3), 128, np.uint8)
    for sigma in (5, 25, 50):
        noisy = deg.add_noise(flat, np.random.default_rng(0), sigma=sigma)
        assert abs(noisy.astype(float).std() - sigma) < 0.05 * sigma + 0.5


def test_poisson_gaussian_noise_grows_with_brightness():
    dark = np.full((128, 128, 3), 30, np.uint8)
    bright = np.full((128, 128, 3), 220, np.uint8)
    stds = [deg.add_noise(im, np.random.default_rng(1), sigma=30, poisson_gaussian=True).astype(float).std()
            for im in (dark, bright)]
    assert stds[1] > 1.5 * stds[0]


@pytest.mark.parametrize("make", [deg.shake_kernel, deg.motion_kernel, deg.disc_kernel, deg.gaussian_kernel])
def test_blur_kernels_are_normalised_and_centred(make):
    for seed in range(5):
        kernel = make(np.random.default_rng(seed))
        assert kernel.shape == (deg.MAX_KERNEL, deg.MAX_KERNEL) and kernel.min() >= 0
        assert abs(kernel.sum() - 1) < 1e-5
        centre = (deg.MAX_KERNEL - 1) / 2
        ys, xs = np.mgrid[0:deg.MAX_KERNEL, 0:deg.MAX_KERNEL]
        # Off-centre mass would shift the image as well as blur it.
        assert abs((kernel * xs).sum() - centre) < 0.6 and abs((kernel * ys).sum() - centre) < 0.6


def test_blur_with_a_delta_kernel_only_adds_the_given_noise():
    photo = _photo()
    delta = np.zeros((5, 5), np.float32)
    delta[2, 2] = 1
    assert np.array_equal(deg.blur(photo, np.random.default_rng(0), kernel=delta, noise_sigma=0), photo)


def test_rain_brightens_along_streaks():
    photo = np.full((128, 128, 3), 60, np.uint8)
    rainy = deg.add_rain(photo, np.random.default_rng(3), haze=0.0)
    brighter = (rainy.astype(int) - photo).min(axis=2) > 10
    assert 0.005 < brighter.mean() < 0.9
    assert (rainy.astype(int) >= photo).all()  # streaks add light; without haze nothing darkens
