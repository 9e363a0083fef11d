"""Rain with every trait drawn on its own: seeded, within the training ranges that keep the
evaluation's rows held out, and actually varied in the ways its docstring promises."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from training import degradations, held_out
from training import randomized_rain as rr


def _flat(value: int, size: int = 96) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def test_seeded_and_keeps_the_photos_size_and_type():
    photo = _flat(90)
    rainy = rr.randomized_rain(photo, np.random.default_rng(3))
    assert np.array_equal(rainy, rr.randomized_rain(photo, np.random.default_rng(3)))
    assert rainy.shape == photo.shape and rainy.dtype == np.uint8
    visible = [np.abs(rr.randomized_rain(photo, np.random.default_rng(seed)).astype(int) - 90).max() > 20
               for seed in range(40)]
    assert np.mean(visible) > 0.8


def test_streaks_fall_along_the_wind():
    # Upright streaks have their gradients across them, that is horizontal.
    ratios = []
    for seed in range(12):
        layer = rr.streak_layer((128, 128), np.random.default_rng(seed), wind=0.0).astype(float)
        across, along = np.diff(layer, axis=1) ** 2, np.diff(layer, axis=0) ** 2
        if across.sum() > 0:
            ratios.append(across.sum() / along.sum())
    assert len(ratios) >= 10 and np.median(ratios) > 3


def test_the_ranges_stay_inside_the_ones_the_evaluation_holds_out():
    # The slanted row holds out angle and length, the downpour row density: widening these
    # ranges into the evaluation's territory must fail here, not quietly un-hold a row.
    assert rr.WIND_DEGREES < held_out.SLANTED.wind_degrees[0]
    assert rr.LENGTH[1] < held_out.SLANTED.length[0]
    assert rr.DENSITY[1] < held_out.DOWNPOUR.density[0]


def test_blends_brighten_or_darken_and_colours_can_come_from_the_scene():
    grey = _flat(120)
    changes = [rr.randomized_rain(grey, np.random.default_rng(seed)).astype(int) - 120 for seed in range(60)]
    assert sum((change > 25).any() for change in changes) > 20      # light streaks
    assert sum((change < -25).any() for change in changes) >= 2     # drops darker than a bright sky
    red = np.zeros((96, 96, 3), np.uint8)
    red[..., 0] = 160
    tints = []
    for seed in range(60):
        lift = rr.randomized_rain(red, np.random.default_rng(seed)).astype(float) - red
        lit = lift.max(axis=2) > 20
        if lit.mean() > 0.01:
            tints.append(lift[lit][:, 0].mean() - lift[lit][:, 2].mean())
    # Some streaks are light (they lift blue as much as red, which has room left) and some show
    # the red scene behind them (they lift red far more).
    assert min(tints) < 0 and max(tints) > 20


def test_a_third_of_the_randomized_mixture_is_randomized_rain_and_none_of_the_broad_one():
    # The broad mixture stays what the bundled derainer was trained on.
    photo = _flat(100, 48)
    hits = {"randomized": 0, "broad": 0}
    for seed in range(300):
        rng = np.random.default_rng(seed)
        rng.random()  # the mixture's own pick
        expected = rr.randomized_rain(photo, rng)
        hits["randomized"] += np.array_equal(degradations.randomized_mixed_rain(photo, np.random.default_rng(seed)),
                                             expected)
        hits["broad"] += np.array_equal(degradations.mixed_rain(photo, np.random.default_rng(seed)), expected)
    assert 0.22 < hits["randomized"] / 300 < 0.38
    assert hits["broad"] == 0
    assert degradations.MIXTURES["randomized"]["denoising"] is degradations.MIXTURES["broad"]["denoising"]


def test_the_randomized_and_broad_rain_mixtures_differ_in_the_rain_alone():
    # Same dry share, same JPEG: an A/B of the two mixtures compares the rain and nothing else.
    broad = degradations.MIXTURES["broad"]["deraining"]
    randomized = degradations.MIXTURES["randomized"]["deraining"]
    assert broad.degradation.degradation is degradations.mixed_rain
    assert randomized == replace(broad, degradation=replace(broad.degradation,
                                                            degradation=degradations.randomized_mixed_rain))


def test_the_card_says_which_held_out_rows_randomized_rain_draws_the_traits_of():
    from training import evaluate

    rows = {setting.key: setting for setting in evaluate.SETTINGS}
    assert evaluate._seen(rows["gusty_rain"], "broad").startswith("held out")
    assert evaluate._seen(rows["gusty_rain"], "randomized").startswith("partly")
    assert evaluate._seen(rows["sheet_rain"], "randomized").startswith("held out")
    assert evaluate._seen(rows["rain_broad"], "randomized").startswith("yes")
    assert evaluate._seen(rows["rain_broad"], "classic").startswith("no")
