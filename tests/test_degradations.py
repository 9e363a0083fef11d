"""The synthetic degradations: seeded, shape- and dtype-preserving, and actually degrading."""

from __future__ import annotations

import pickle

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
    # Nearly every draw changes the photo (the training mixtures pass about a tenth through
    # untouched), and typical draws clearly (a sigma near 0 may barely).
    assert sum(v < 60 for v in values) >= 10 and np.median(values) < 35


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


# ------------------------------------------------------------------------------------------------
# The realistic families of issue 16: camera pipeline, more rain, more blur
# ------------------------------------------------------------------------------------------------

from training import camera  # noqa: E402  (kept beside the tests that use it)


def _flat(level: int = 128, size: int = 128) -> np.ndarray:
    return np.full((size, size, 3), level, np.uint8)


def _noise_correlation(noisy: np.ndarray, clean: np.ndarray, lag: int) -> float:
    """Correlation of the noise (green channel) with itself ``lag`` pixels to the right."""
    noise = noisy[..., 1].astype(np.float64) - clean[..., 1]
    noise -= noise.mean()
    return float((noise[:, :-lag] * noise[:, lag:]).mean() / noise.var())


def _camera(**changes) -> camera.Camera:
    """A fixed camera: strong shot noise, no JPEG, no resizing, unless changed."""
    settings = dict(shot=1e-2, read=1e-4, red_gain=2.0, blue_gain=1.6, ccm=np.eye(3, dtype=np.float32), tone=0.5,
                    bayer_phase=(0, 0), sharpen=0.0, chroma_sigma=0.0, jpeg_quality=0, resize=1.0)
    settings.update(changes)
    return camera.Camera(**settings)


def test_unprocessing_then_processing_gives_the_photo_back():
    photo = _photo().astype(np.float32) / 255
    cam = camera.draw_camera(np.random.default_rng(4))
    # Colours the camera can record come back to within a fraction of an 8-bit level.
    back = camera.process(camera.unprocess(photo, cam), cam)
    inside = (camera.unprocess(photo, cam) < 0.999).all(axis=-1) & (camera.unprocess(photo, cam) > 1e-4).all(axis=-1)
    assert inside.mean() > 0.5
    assert np.abs(back - photo)[inside].max() < 0.5 / 255


@pytest.mark.parametrize("phase", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_bilinear_demosaic_keeps_recorded_samples_and_linear_ramps(phase):
    yy, xx = np.mgrid[0:16, 0:20].astype(np.float32)
    ramp = np.stack([0.01 * xx, 0.02 * yy + 0.1, 0.01 * (xx + yy)], axis=-1)
    raw = camera.mosaic(ramp, phase)
    rgb = camera.demosaic_bilinear(raw, phase)
    masks = camera._bayer_masks(raw.shape, phase)
    assert np.allclose(rgb[masks], ramp[masks])
    # Averaging neighbours is exact for a linear ramp away from the reflected border.
    assert np.allclose(rgb[1:-1, 1:-1], ramp[1:-1, 1:-1], atol=1e-6)


def test_camera_noise_is_seeded_and_keeps_size_and_dtype():
    photo = _photo(72, 50)
    first = camera.camera_noise(photo, np.random.default_rng(3))
    assert np.array_equal(first, camera.camera_noise(photo, np.random.default_rng(3)))
    assert not np.array_equal(first, camera.camera_noise(photo, np.random.default_rng(4)))
    as_float = camera.camera_noise(photo / 255.0, np.random.default_rng(3))
    assert first.shape == as_float.shape == photo.shape and first.dtype == np.uint8 and as_float.dtype == np.float64


def test_camera_noise_is_correlated_between_neighbours_unlike_white_noise():
    flat = _flat(100)
    white = deg.add_noise(flat, np.random.default_rng(0), sigma=15)
    raw_noise = camera.camera_noise(flat, np.random.default_rng(0), camera=_camera())
    assert abs(_noise_correlation(white, flat, 1)) < 0.05
    # Bilinear demosaicing spreads each raw sample over its neighbours.
    assert _noise_correlation(raw_noise, flat, 1) > 0.3


def test_spreading_the_grain_makes_it_coarser_and_shrinking_it_finer():
    flat = _flat(100, 192)
    lag3 = {}
    for resize in (0.5, 1.0, 3.0):
        noisy = camera.camera_noise(flat, np.random.default_rng(1), camera=_camera(resize=resize))
        lag3[resize] = _noise_correlation(noisy, flat, 3)
    assert lag3[3.0] > 0.3 > lag3[1.0] and lag3[0.5] < lag3[1.0] + 0.05


def test_camera_noise_grows_with_the_shot_noise_and_is_strongest_in_the_dark_after_gamma():
    def error(level, shot):
        flat = _flat(level)
        noisy = camera.camera_noise(flat, np.random.default_rng(2), camera=_camera(shot=shot, read=1e-7))
        return np.abs(noisy.astype(float) - flat).mean()

    assert error(100, 1e-2) > 2.5 * error(100, 1e-3)  # sqrt(10) for shot noise alone
    # Shot noise grows with the signal, but the gamma curve expands dark levels far more.
    assert error(40, 1e-2) > error(220, 1e-2)


def test_camera_pipeline_without_noise_changes_nothing():
    photo = _photo()
    silent = camera.camera_noise(photo, np.random.default_rng(0), camera=_camera(shot=0.0, read=0.0, sharpen=0.8,
                                                                                chroma_sigma=1.5, resize=2.0))
    assert np.abs(silent.astype(int) - photo).max() <= 1


def test_lower_jpeg_quality_loses_more():
    photo = _photo().astype(np.float32) / 255
    errors = [np.abs(camera.jpeg(photo, quality) - photo).mean() for quality in (20, 60, 95)]
    assert errors[0] > errors[1] > errors[2]


def test_noise_estimate_reads_white_noise_and_understates_coarse_grain():
    flat = _flat(128, 256).astype(np.float64)
    rng = np.random.default_rng(5)
    white = np.clip(np.rint(flat + rng.normal(0, 10, flat.shape)), 0, 255).astype(np.uint8)
    assert abs(camera.estimate_noise_sigma(white) - 10) < 0.5
    assert camera.estimate_noise_sigma(_flat()) == 0
    coarse = flat + camera.resize_plane(rng.normal(0, 10, (64, 64, 3)).astype(np.float32), (256, 256))
    assert camera.estimate_noise_sigma(np.clip(np.rint(coarse), 0, 255).astype(np.uint8)) < 4
    # Float images in [0, 1] are read on the same 0-255 scale.
    assert abs(camera.estimate_noise_sigma(white / 255) - camera.estimate_noise_sigma(white)) < 1e-9


@pytest.mark.parametrize("family", [deg.saturating_rain, deg.smeared_rain, deg.misty_rain, deg.faint_rain,
                                    deg.scene_lit_rain, deg.mixed_rain,
                                    deg.mixed_blur, deg.linear_light_blur, deg.varying_blur, deg.broad_blur,
                                    deg.mixed_noise, deg.clumped_grain])
def test_new_families_are_seeded_keep_dtype_and_degrade(family):
    photo = _photo()
    first = family(photo, np.random.default_rng(11))
    assert np.array_equal(first, family(photo, np.random.default_rng(11)))
    assert first.shape == photo.shape and first.dtype == np.uint8
    values = [_psnr(family(photo, np.random.default_rng(seed)), photo) for seed in range(8)]
    assert np.median(values) < 38


@pytest.mark.parametrize("shape", deg.CLUMP_SHAPES)
def test_clumped_grain_shapes_make_neighbours_alike(shape):
    white = deg.partly_shared_noise((96, 96, 3), 0.5, np.random.default_rng(2))
    assert abs(np.corrcoef(white[:, :-1, 0].ravel(), white[:, 1:, 0].ravel())[0, 1]) < 0.1
    clumped = shape(white, np.random.default_rng(3))
    assert clumped.shape == white.shape
    assert np.corrcoef(clumped[:, :-1, 0].ravel(), clumped[:, 1:, 0].ravel())[0, 1] > 0.3
    # The channels share the grain as much as the white noise did.
    assert np.corrcoef(clumped[..., 0].ravel(), clumped[..., 2].ravel())[0, 1] > 0.3


def test_saturating_rain_covers_the_scene_where_streaks_pile_up():
    dense = deg.RainRanges(density=(0.01, 0.012), length=(20, 30), width=(2.0, 3.0), brightness=(1.0, 1.0))
    dark, grey = (deg.saturating_rain(_flat(level), np.random.default_rng(0), dense).astype(int) for level in (20, 120))
    streak = dark.max(axis=2) > 100
    assert 0.01 < streak.mean() < 0.9
    # Under opaque drops the scene shows through less: additive rain would keep the 100-level gap.
    assert np.median((grey - dark)[streak]) < 60


def test_scene_lit_rain_takes_its_colour_from_the_scene():
    # Over a red wall a drop shows brightened red: the red-green gap never shrinks, where a blend
    # towards near-white light (every other family) closes it.
    red = _flat(40)
    red[..., 0] = 160
    rainy = deg.scene_lit_rain(red, np.random.default_rng(3)).astype(int)
    streak = np.abs(rainy - red).sum(axis=2) > 10
    assert 0.01 < streak.mean() < 0.9
    assert (rainy[streak][:, 0] - rainy[streak][:, 1]).min() >= 118
    white = deg.faint_rain(red, np.random.default_rng(3)).astype(int)
    assert (white[..., 0] - white[..., 1]).min() < 110


def test_misty_rain_lowers_contrast():
    photo = _photo()
    thick = deg.RainRanges(density=(1e-4, 2e-4), mist=(0.4, 0.4))
    assert deg.misty_rain(photo, np.random.default_rng(0), thick).astype(float).std() < 0.8 * photo.std()


@pytest.mark.parametrize("make", [deg.acceleration_kernel, deg.stroke_kernel, deg.arc_kernel])
def test_trajectory_kernels_are_normalised_and_off_centre_only_as_asked(make):
    centre = (deg.MAX_KERNEL - 1) / 2
    ys, xs = np.mgrid[0:deg.MAX_KERNEL, 0:deg.MAX_KERNEL]
    offsets = []
    for seed in range(6):
        for max_offset in (0.0, 2.5):
            kernel = make(np.random.default_rng(seed), max_offset=max_offset)
            assert kernel.min() >= 0 and abs(kernel.sum() - 1) < 1e-5
            shift = np.hypot((kernel * xs).sum() - centre, (kernel * ys).sum() - centre)
            assert shift < max_offset + 0.6
            offsets.append(shift)
    assert max(offsets) > 1.0  # asking for an offset does move some kernels


def test_blur_then_record_with_a_delta_kernel_and_no_noise_or_jpeg_is_the_photo():
    photo = _photo()
    delta = np.zeros((5, 5), np.float32)
    delta[2, 2] = 1
    same = deg.blur_then_record(photo, np.random.default_rng(0), delta, noise_sigma=(0, 0), jpeg_chance=0.0)
    assert np.array_equal(same, photo)


def test_blur_in_linear_light_spreads_a_bright_edge_further_into_the_dark():
    edge = np.full((64, 64, 3), 25, np.uint8)
    edge[:, 32:] = 230
    box = np.zeros((9, 9), np.float32)
    box[4, :] = 1 / 9
    dark_side = (slice(8, -8), slice(28, 32))
    for seed in range(4):
        in_light = deg.linear_light_blur(edge, np.random.default_rng(seed), kernel=box)
        in_values = deg.blur_then_record(edge, np.random.default_rng(seed), box)
        assert in_light[dark_side].mean() > in_values[dark_side].mean() + 25
        # Far from the edge both leave the flat sides as they were, give or take noise and JPEG.
        assert abs(in_light[:, :20].astype(float).mean() - 25) < 2
        assert abs(in_light[:, 44:].astype(float).mean() - 230) < 2


def _blockwise_psnr_spread(degraded: np.ndarray, photo: np.ndarray, blocks: int = 4) -> float:
    side = photo.shape[0] // blocks
    values = [_psnr(degraded[y:y + side, x:x + side], photo[y:y + side, x:x + side])
              for y in range(0, blocks * side, side) for x in range(0, blocks * side, side)]
    return max(values) - min(values)


def _blocky_texture() -> np.ndarray:
    texture = np.random.default_rng(5).integers(0, 256, (128, 128, 3)).astype(np.uint8)
    return np.repeat(np.repeat(texture[::2, ::2], 2, axis=0), 2, axis=1)  # detail at every scale a kernel reaches


def test_varying_blur_changes_across_the_frame_unlike_the_uniform_families():
    texture = _blocky_texture()
    varying = [_blockwise_psnr_spread(deg.varying_blur(texture, np.random.default_rng(seed)), texture)
               for seed in range(12)]
    uniform = [_blockwise_psnr_spread(deg.mixed_blur(texture, np.random.default_rng(seed)), texture)
               for seed in range(12)]
    assert max(uniform) < 2
    assert np.median(varying) > 3


def test_the_deblurring_mixture_blurs_some_photos_unevenly():
    # Trained on blur that is the same everywhere, the deblurrer barely touched held-out camera roll
    # and zoom; a quarter of the blurred patches now change across the frame.
    texture = _blocky_texture()
    degraded = [deg.degrade("deblurring", texture, np.random.default_rng(seed)) for seed in range(60)]
    spreads = [_blockwise_psnr_spread(image, texture) for image in degraded if not np.array_equal(image, texture)]
    assert 0.05 < np.mean([spread > 3 for spread in spreads]) < 0.4


def test_smooth_ramp_runs_from_zero_to_one_and_is_smooth():
    for seed in range(12):
        ramp = deg._smooth_ramp((96, 128), np.random.default_rng(seed))[..., 0]
        assert ramp.shape == (96, 128) and ramp.min() >= 0 and ramp.max() <= 1
        # The transition is at least a fifth of the frame: no neighbours more than 1/19 apart.
        assert max(np.abs(np.diff(ramp, axis=0)).max(), np.abs(np.diff(ramp, axis=1)).max()) < 1 / 19
    spans = [np.ptp(deg._smooth_ramp((96, 128), np.random.default_rng(seed))) for seed in range(12)]
    assert np.median(spans) > 0.5


def test_classic_mixture_is_what_the_earlier_weights_trained_on():
    photo = _photo()
    for task, family in (("denoising", deg.add_noise), ("deblurring", deg.blur), ("deraining", deg.add_rain)):
        assert np.array_equal(deg.degrade(task, photo, np.random.default_rng(1), mixture="classic"),
                              family(photo, np.random.default_rng(1)))
    with pytest.raises(ValueError):
        deg.degrade("denoising", photo, np.random.default_rng(1), mixture="nonsense")


def test_faint_rain_is_dimmer_than_the_other_families_and_may_darken():
    grey = _flat(90)
    def change(family, seed):
        return np.abs(family(grey, np.random.default_rng(seed)).astype(int) - 90).max(axis=2)
    faint = [np.percentile(change(deg.faint_rain, seed), 99.5) for seed in range(12)]
    classic = [np.percentile(change(deg.add_rain, seed), 99.5) for seed in range(12)]
    assert np.median(faint) < 0.5 * np.median(classic)
    # Some drops darken the scene instead of adding light.
    assert any((deg.faint_rain(grey, np.random.default_rng(seed)).astype(int) < 85).any() for seed in range(12))


def test_a_blunt_streak_keeps_its_brightness_to_its_ends():
    def along(taper):
        kernel = deg._streak_kernel(30.0, 0.0, 1.0, taper)
        return kernel[:, kernel.shape[1] // 2]
    tapered, blunt = along(0.5), along(0.0)
    lit = blunt > 0.5
    # Three pixels in from the lit ends: the blunt streak is still near full, the tapered one dimmer.
    ends = np.flatnonzero(lit)[[3, -4]]
    assert blunt[ends].min() > 0.9 and tapered[ends].max() < blunt[ends].min()


@pytest.mark.parametrize("task", ["denoising", "deblurring", "deraining"])
def test_the_training_mixture_passes_some_photos_through_untouched(task):
    # Clean in, clean out: a denoiser shown only noisy patches smoothed noiseless photos too, a
    # deblurrer shown only blurred ones sharpened sharp photos, and a derainer shown only rain
    # took window frames for streaks.
    photo = _photo(48, 48)
    untouched = [np.array_equal(deg.degrade(task, photo, np.random.default_rng(seed)), photo) for seed in range(500)]
    assert 0.05 < np.mean(untouched) < 0.14


@pytest.mark.parametrize("evaluated", [deg.mixed_blur, deg.mixed_rain])
def test_the_evaluated_broad_mixtures_always_damage(evaluated):
    # The card's broad-blur and broad-rain rows score these themselves: no photo may pass untouched.
    # (Sparse rain can miss a 48 px square altogether, so the photo is larger.)
    photo = _photo(96, 96)
    assert not any(np.array_equal(evaluated(photo, np.random.default_rng(seed)), photo) for seed in range(200))


@pytest.mark.parametrize("mixture", sorted(deg.MIXTURES))
def test_every_training_mixture_reaches_the_patch_workers(mixture):
    # `--workers` hands the sampler, degradation included, to other processes; a closure would not
    # survive the trip where they are started by pickling (spawn, forkserver).
    photo = _photo(48, 48)
    for task, degradation in deg.MIXTURES[mixture].items():
        arrived = pickle.loads(pickle.dumps(degradation))
        there, here = arrived(photo, np.random.default_rng(3)), degradation(photo, np.random.default_rng(3))
        assert np.array_equal(there, here), task


def test_rain_in_the_training_mixture_is_sometimes_saved_as_a_jpeg():
    # Rainy photos reach a derainer as JPEGs; one trained on rain never saved as one gained up to
    # 1.3 dB less on held-out renderers that save theirs than on the same rain unsaved.
    photo = _photo(48, 48)
    saved = []
    for seed in range(400):
        rng = np.random.default_rng(seed)
        if rng.random() < deg.DRY_SHARE:
            continue
        unsaved = deg.mixed_rain(photo, rng)
        saved.append(not np.array_equal(deg.degrade("deraining", photo, np.random.default_rng(seed)), unsaved))
    assert 0.3 < np.mean(saved) < 0.5


def test_saving_as_a_jpeg_loses_detail_only_when_drawn():
    photo = _photo()
    untouched = lambda image, rng: image.copy()  # noqa: E731
    never = deg.ThenSavedAsJpeg(untouched, 0.0, (10.0, 10.0))
    always = deg.ThenSavedAsJpeg(untouched, 1.0, (10.0, 10.0))
    assert np.array_equal(never(photo, np.random.default_rng(0)), photo)
    saved = always(photo, np.random.default_rng(0))
    assert saved.dtype == photo.dtype and saved.shape == photo.shape
    assert 20.0 < _psnr(saved, photo) < 40.0
