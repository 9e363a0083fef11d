"""The evaluation script that regenerates the model card's table, run on a tiny real network."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from models import MPRNetConfig, save_safetensors
from service.devices import cpu_summary
from training import evaluate, held_out
from training.card import markers, replace_section

TINY = MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_safetensors(TINY.build(), path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kodak")
    rng = np.random.default_rng(0)
    for index in range(2):
        coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((48, 40), Image.BICUBIC).save(folder / f"kodim{index:02d}.png")
    return folder


def test_evaluation_seeds_are_fixed_per_setting_and_photo(photos):
    images = evaluate.load_kodak(photos)
    shake, mild = (next(s for s in evaluate.SETTINGS if s.key == key) for key in ("shake", "mild_shake"))
    clean = images[0][1]
    assert np.array_equal(evaluate.degraded(shake, 0, clean), evaluate.degraded(shake, 0, clean))
    assert not np.array_equal(evaluate.degraded(shake, 0, clean), evaluate.degraded(shake, 1, clean))
    assert not np.array_equal(evaluate.degraded(shake, 0, clean), evaluate.degraded(mild, 0, clean))


DEBLURRING_ROWS = ["shake", "mild_shake", "linear_motion", "defocus", "gaussian_blur", "trajectories", "arc",
                  "offcentre", "clean_deblurring", "camera_roll", "camera_zoom"]


def test_table_lists_every_setting_of_the_task_and_writes_the_card(photos, tiny_weights, tmp_path, capsys,
                                                                  monkeypatch):
    card = tmp_path / "CARD.md"
    start, end = markers("eval-table")
    card.write_text(f"before\n{start}\nold table\n{end}\nafter\n")
    monkeypatch.setattr(evaluate, "CBM3D_CACHE", tmp_path / "no-cbm3d.json")
    out = tmp_path / "results.json"
    assert evaluate.main(["--data", str(photos), "--tasks", "deblurring", "--threads", "1", "--no-cache",
                          "--weights", f"deblurring={tiny_weights}", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    # The heading names the folder measured, not Kodak24 whatever it was.
    assert f"{photos.name} (2 photos, 48x40), mean over photos" in printed and "Kodak24" not in printed
    mixed = [("a", np.zeros((40, 48, 3))), ("b", np.zeros((500, 300, 3)))]
    assert evaluate.describe_photos(photos, mixed) == f"{photos.name} (2 photos, 48x40 to 300x500)"
    rows = [line for line in printed.splitlines() if line.startswith("| deblurring |")]
    # The main table's rows, then the generalisation summary's one row for the task.
    assert len(rows) == len(DEBLURRING_ROWS) + 1
    assert "camera-shake trajectories" in rows[0] and "mild camera shake" in rows[1]
    assert ["linear motion" in rows[2], "defocus" in rows[3], "Gaussian blur" in rows[4]] == [True] * 3
    # Each row says whether training sampled it; held-out rows say what is new.
    # The tiny weights' file records no mixture: classic, so the broad mixture's row is unseen.
    assert "| yes |" in rows[0] and "no: broad mixture" in rows[5]
    assert "held out: family" in rows[6] and "held out: JPEG < 50, offset" in rows[7]
    assert "clean photo" in rows[8] and "| identical |" in rows[8]
    assert "camera roll" in rows[9] and "held out: family" in rows[9]
    assert "camera zoom" in rows[10] and "held out: family" in rows[10]
    # The summary: five rows training sampled, five it never did, the weakest of those named.
    assert "Generalisation" in printed and "(5) |" in rows[11] and rows[11].count("(5) |") == 2
    assert any(label in rows[11] for label in ("circular-arc", "off-centre", "broad blur", "camera roll",
                                               "camera zoom"))

    results = json.loads(out.read_text())["results"]["deblurring"]
    # Beside the clean photos' mean, the one the network damages most, by name.
    worst = min(results["settings"]["clean_deblurring"], key=lambda row: row["psnr"])
    assert rows[11].endswith(f"({worst['psnr']:.2f} dB, {worst['image']}) |")
    assert list(results["settings"]) == DEBLURRING_ROWS
    for key, per_image in results["settings"].items():
        assert [r["image"] for r in per_image] == ["kodim00", "kodim01"]
        assert all(0 < r["ssim"] <= 1 for r in per_image)
        if key != "clean_deblurring":
            assert all(0 < r["classic_ssim"] <= 1 and r["classic_psnr"] > 10 and r["input_psnr"] > 10
                       for r in per_image)
    classic = [line for line in printed.splitlines() if line.startswith("| ") and "unsharp mask" in line]
    assert len(classic) == len(DEBLURRING_ROWS) - 1  # every row but the clean one
    # The off-centre row, whose blur also moves the photo, is scored after aligning too; no other is.
    assert [key for key, per_image in results["settings"].items() if "aligned_psnr" in per_image[0]] == ["offcentre"]
    offcentre = results["settings"]["offcentre"]
    aligned_gain = np.mean([r["aligned_psnr"] - r["aligned_input_psnr"] for r in offcentre])
    aligned = [line for line in printed.splitlines() if line.startswith("| acceleration trajectories up to")
               and "unsharp mask" not in line]
    assert len(aligned) == 1 and f"{aligned_gain:+.2f} dB |" in aligned[0]

    # --write-card replaces only the marked section of the card.
    evaluate.write_card("new table", card)
    assert card.read_text() == f"before\n{start}\nnew table\n{end}\nafter\n"


def test_architecture_table_times_each_candidate_on_both_cpu_backends_and_names_the_cpu(tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.setattr(evaluate, "ARCHITECTURES", (dataclasses.asdict(TINY),))
    card = tmp_path / "CARD.md"
    start, end = markers("arch-table")
    card.write_text(f"before\n{start}\nold table\n{end}\nafter\n")
    monkeypatch.setattr(evaluate, "replace_section", lambda name, text: replace_section(name, text, card))
    assert evaluate.main(["--architectures", "--threads", "1", "--write-card"]) == 0
    printed = capsys.readouterr().out.strip()
    caption, blank, header, rule, row = printed.splitlines()
    # A CPU time means little without the CPU: its name and the instructions that set the kernels.
    assert cpu_summary()["model"] in caption and "with avx2" in caption and "1 threads" in caption
    assert "OpenVINO s / 512x512 (CPU default)" in header and "PyTorch s / 512x512" in header
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:4] == ["8", "4", "4", "1"]
    assert cells[4] == f"{sum(p.numel() for p in TINY.build().parameters()):,}"
    openvino_seconds, torch_seconds = float(cells[5]), float(cells[6])
    assert 0 < openvino_seconds < 30 and 0 < torch_seconds < 30
    assert card.read_text() == f"before\n{start}\n{printed}\n{end}\nafter\n"


def test_denoising_rows_report_residual_noise_and_the_clean_photo(photos, tiny_weights, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(evaluate, "CBM3D_CACHE", tmp_path / "no-cbm3d.json")
    out = tmp_path / "results.json"
    assert evaluate.main(["--data", str(photos), "--tasks", "denoising", "--threads", "1", "--no-cache",
                          "--no-timing", "--weights", f"denoising={tiny_weights}", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU s / 512x512" not in printed and "Not timed" in printed
    settings = json.loads(out.read_text())["results"]["denoising"]["settings"]
    for key in ("camera_noise", "coarse_grain", "high_iso", "coloured_noise", "noisy_jpeg", "film_grain",
                "banded_noise", "clean_denoising"):
        for row in settings[key]:
            assert row["sigma_in"] >= 0 and row["sigma_out"] >= 0 and row["rms_out"] >= 0
    assert all(row["rms_in"] == 0 and row["input_psnr"] > 99 for row in settings["clean_denoising"])
    noise_rows = [line for line in printed.splitlines()
                  if "->" in line and line.count("|") == 7 and not line.startswith("| Degradation")]
    assert len(noise_rows) == 8 and any("held out: spread" in line for line in noise_rows)
    # Without a CBM3D cache the card still states the recorded CBM3D figure beside ours.
    assert f"{evaluate.CBM3D_SIGMA25_REFERENCE:.2f} dB" in printed


def test_results_are_cached_per_weights_and_previous_weights_are_shown_beside(photos, tiny_weights, tmp_path,
                                                                              capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "CBM3D_CACHE", tmp_path / "no-cbm3d.json")
    monkeypatch.setattr(evaluate, "RESULTS_CACHE", tmp_path / "eval" / "results.json")
    arguments = ["--data", str(photos), "--tasks", "deraining", "--threads", "1", "--settings", "rain", "slanted"]
    assert evaluate.main(arguments + ["--weights", f"deraining={tiny_weights}"]) == 0
    first = capsys.readouterr().out
    cache = json.loads((tmp_path / "eval" / "results.json").read_text())
    digest = evaluate.weights_digest(evaluate.load_checkpoint(tiny_weights).model)
    assert sum(key.startswith(digest) for key in cache) == 2 * 2 + 1

    def no_computing(*args):
        raise AssertionError("a cached row was computed again")

    monkeypatch.setattr(evaluate, "_evaluate_image", no_computing)
    assert evaluate.main(arguments + ["--weights", f"deraining={tiny_weights}"]) == 0
    assert capsys.readouterr().out == first

    # A generator changed under the same row and label is measured again, not served from the cache.
    monkeypatch.undo()
    monkeypatch.setattr(evaluate, "CBM3D_CACHE", tmp_path / "no-cbm3d.json")
    monkeypatch.setattr(evaluate, "RESULTS_CACHE", tmp_path / "eval" / "results.json")
    heavier = [dataclasses.replace(s, degrade=lambda im, rng: evaluate.add_rain(im, rng, layers=3))
               if s.key == "rain" else s for s in evaluate.SETTINGS]
    monkeypatch.setattr(evaluate, "SETTINGS", tuple(heavier))
    assert evaluate.main(arguments + ["--weights", f"deraining={tiny_weights}"]) == 0
    cache = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert sum(key.startswith(f"{digest}|rain|") for key in cache) == 2 * 2
    assert sum(key.startswith(f"{digest}|slanted|") for key in cache) == 2
    capsys.readouterr()

    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_safetensors(TINY.build(), other)
    monkeypatch.undo()
    monkeypatch.setattr(evaluate, "CBM3D_CACHE", tmp_path / "no-cbm3d.json")
    monkeypatch.setattr(evaluate, "RESULTS_CACHE", tmp_path / "eval" / "results.json")
    assert evaluate.main(arguments + ["--weights", f"deraining={other}", "--previous",
                                      f"deraining={tiny_weights}"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| Task |"))
    assert "Previous weights PSNR" in header


def test_off_centre_rows_cached_before_the_aligned_scores_are_measured_again(photos, tiny_weights):
    images = evaluate.load_kodak(photos)
    cache = {}
    evaluate.evaluate_task("deblurring", tiny_weights, images, print, cache, only={"offcentre"}, timed=False)
    for row in cache.values():
        del row["aligned_psnr"], row["aligned_input_psnr"]
    result = evaluate.evaluate_task("deblurring", tiny_weights, images, print, cache, only={"offcentre"},
                                    timed=False)
    assert all("aligned_psnr" in row and "aligned_input_psnr" in row for row in result["settings"]["offcentre"])


def _smooth_scene(dy: float, dx: float) -> np.ndarray:
    # A photo defined everywhere, not only on the pixel grid, so it can be moved by a fraction of a pixel exactly.
    y, x = np.mgrid[:96, :112].astype(np.float64)
    y, x = y - dy, x - dx
    planes = [np.sin(0.55 * x + 0.4 * c) * np.cos(0.45 * y - 0.3 * c) + 0.5 * np.sin(0.05 * (x + 2 * y) + c)
              for c in range(3)]
    return np.clip(np.round(128 + 60 * np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)


def test_aligned_psnr_forgives_a_translation_and_nothing_else():
    clean = _smooth_scene(0.0, 0.0)
    moved = _smooth_scene(1.25, -0.625)
    assert evaluate.psnr(moved, clean) < 25
    assert evaluate.aligned_psnr(moved, clean) > 40  # the grid holds the exact shift: only rounding is left
    assert evaluate.aligned_psnr(_smooth_scene(2.375, 0.5), clean) > 40
    blurred = np.asarray(Image.fromarray(clean).filter(ImageFilter.GaussianBlur(2)))
    assert evaluate.aligned_psnr(blurred, clean) < 35  # blur is not a translation
    assert evaluate.aligned_psnr(blurred, clean) == pytest.approx(
        evaluate.psnr(blurred[16:-16, 16:-16], clean[16:-16, 16:-16]), abs=0.3)


def test_noise_estimate_sees_white_noise_not_a_flat_photo():
    flat = np.full((64, 64, 3), 90, np.uint8)
    noisy = evaluate.add_noise(flat, np.random.default_rng(0), sigma=20)
    assert evaluate.estimate_noise_sigma(flat) == 0
    assert abs(evaluate.estimate_noise_sigma(noisy) - 20) < 2


def test_shipping_checks_flag_regressions_cbm3d_and_damaged_clean_photos():
    def rows(psnr):
        return [{"image": "a", "psnr": psnr, "input_psnr": 20.0}]

    previous = {"denoising": {"settings": {"noise25": rows(31.6), "noise50": rows(28.3), "camera_noise": rows(25.0)}}}
    results = {"denoising": {"settings": {"noise25": rows(31.4), "noise50": rows(27.9), "camera_noise": rows(22.0),
                                          "clean_denoising": rows(35.0)}}}
    checks = {description.split(":")[0]: passed for passed, description in
              evaluate.shipping_checks(results, previous)}
    assert checks == {"denoising sigma 25": True, "denoising noise25": True, "denoising noise50": False,
                      "denoising camera_noise": False, "denoising on clean photos": False}


def test_held_out_camera_rows_lie_outside_every_range_the_denoising_mixture_draws():
    # A "held out" label is only true while training never samples there; widening a training
    # range (or adding a reweighted one) into the evaluation's territory must fail here.
    from training.degradations import DENOISING_CAMERA_RANGES

    assert len(DENOISING_CAMERA_RANGES) >= 2
    for ranges in DENOISING_CAMERA_RANGES:
        assert held_out.COARSE_GRAIN.spread[0] > ranges.spread[1]
        assert held_out.HIGH_ISO.shot[0] >= ranges.shot[1]
        assert ranges.jpeg_quality[0] >= 40  # the noisy-JPEG row's quality stays below: 15-35


def test_refracting_rain_streaks_take_their_colour_from_the_scene_behind_them():
    # The held-out rain family shows a blurred, brightened scene through each streak: over a
    # red photo its streaks are reddish, where every training family's streaks are near-white
    # or darken the scene.
    red = np.zeros((96, 96, 3), np.uint8)
    red[..., 0] = 150
    rainy = held_out.refracted_rain(red, np.random.default_rng(0))
    assert np.array_equal(rainy, held_out.refracted_rain(red, np.random.default_rng(0)))
    assert rainy.shape == red.shape and rainy.dtype == np.uint8
    changed = np.abs(rainy.astype(int) - red).sum(axis=2) > 10
    assert 0.05 < changed.mean() < 0.9
    assert (rainy[changed][:, 0] > 150).all() and rainy[changed][:, 1:].max() < 60


def test_film_grain_is_shared_by_the_channels_and_clumped_over_pixels():
    grey = np.full((128, 128, 3), 128, np.uint8)
    grain = held_out.film_grain(grey, np.random.default_rng(0)).astype(float) - 128
    assert np.array_equal(held_out.film_grain(grey, np.random.default_rng(0)),
                          held_out.film_grain(grey, np.random.default_rng(0)))
    assert grain.std() > 4
    # Mostly the same grain in every channel, and neighbours alike: clumps, not white noise.
    assert np.corrcoef(grain[..., 0].ravel(), grain[..., 2].ravel())[0, 1] > 0.6
    assert np.corrcoef(grain[:, :-1, 1].ravel(), grain[:, 1:, 1].ravel())[0, 1] > 0.3


def test_banded_noise_runs_along_rows_and_is_strongest_in_the_shadows():
    photo = np.full((128, 128, 3), 40, np.uint8)  # dark, but above black so the noise is not clipped
    photo[:, 64:] = 200
    noisy = held_out.banded_noise(photo, np.random.default_rng(1))
    assert np.array_equal(noisy, held_out.banded_noise(photo, np.random.default_rng(1)))
    noise = noisy.astype(float) - photo
    dark, bright = noise[:, 8:56], noise[:, 72:120]
    # Averaging a row keeps its banding and cancels the per-pixel noise; a column's average cancels both.
    assert dark.mean(axis=1).std() > 3 * dark.mean(axis=0).std()
    assert dark.std() > 1.3 * bright.std()


def test_drawn_rain_shows_over_dark_parts_and_barely_over_bright_ones():
    # Added in linear light: the same streak lifts a dark pixel by far more levels than a bright one.
    photo = np.full((128, 128, 3), 30, np.uint8)
    photo[:, 64:] = 220
    rainy = held_out.drawn_rain(photo, np.random.default_rng(4))
    assert np.array_equal(rainy, held_out.drawn_rain(photo, np.random.default_rng(4)))
    lift = rainy.astype(float) - photo
    assert lift[:, 8:56].mean() > 3 * abs(lift[:, 72:120].mean())
    # Streaks, not a veil: a minority of the dark half is lifted.
    assert 0.02 < (lift[:, 8:56].max(axis=2) > 20).mean() < 0.5


def test_gusty_rain_lightens_dark_parts_and_never_darkens():
    photo = np.full((128, 128, 3), 30, np.uint8)
    photo[:, 64:] = 250  # the brightest tenth: the sky whose colour the streaks take
    rainy = held_out.gusty_rain(photo, np.random.default_rng(2))
    assert np.array_equal(rainy, held_out.gusty_rain(photo, np.random.default_rng(2)))
    lift = rainy.astype(float) - photo
    # A lighten blend: streaks show over the dark half, not over a sky as bright as they are,
    # and nothing gets darker but for JPEG's ringing beside a streak.
    assert 0.01 < (lift[:, 8:56].max(axis=2) > 20).mean() < 0.5
    assert np.abs(lift[:, 72:120]).mean() < 2
    darkened = -np.minimum(lift[:, 8:56], 0).mean()
    assert darkened < 0.2 * np.maximum(lift[:, 8:56], 0).mean()
    assert rainy.shape == photo.shape and rainy.dtype == np.uint8


def test_gusty_rain_blends_by_the_maximum_so_faint_streak_ends_vanish_over_mid_grey():
    # Lighten: a streak shows over mid-grey only where it is brighter than the grey, so far fewer
    # grey pixels than dark ones are lifted. Added or alpha-blended streaks (measured: 1.03x and
    # 0.84x as many) would lift nearly as many.
    photo = np.full((128, 128, 3), 30, np.uint8)
    photo[:, 43:86] = 140
    photo[:, 86:] = 250
    lift = held_out.gusty_rain(photo, np.random.default_rng(2)).astype(float).max(axis=2) - photo[..., 0]
    dark, grey = (lift[:, 4:39] > 12).mean(), (lift[:, 47:82] > 12).mean()
    assert dark > 0.05
    assert grey < 0.4 * dark


def test_evaluation_photos_are_read_as_the_service_reads_uploads(tmp_path):
    # A 16-bit grey photo read by a plain RGB conversion is white; an EXIF-turned one lies sideways.
    Image.fromarray(np.full((40, 48), 100 * 257, np.uint16)).save(tmp_path / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((40, 64, 3), 90, np.uint8)).save(tmp_path / "turned.jpg", exif=exif)
    (grey_name, grey), (turned_name, turned) = evaluate.load_kodak(tmp_path)
    assert (grey_name, turned_name) == ("grey16", "turned")
    assert grey.shape == (40, 48, 3) and np.abs(grey.astype(int) - 100).max() <= 1
    assert turned.shape == (64, 40, 3)


def _bad_evaluation_arguments(photos, weights):
    return {"misspelt task": ["--weights", f"denosing={weights}"],
            "task not evaluated": ["--weights", f"deblurring={weights}"],
            "no TASK=": ["--weights", str(weights)],
            "missing weights": ["--weights", f"denoising={photos}/nope.safetensors"],
            "previous not evaluated": ["--previous", f"deraining={weights}"],
            "missing data": ["--data", f"{photos}/nope"],
            "limit 0": ["--limit", "0"],
            "threads 0": ["--threads", "0"]}


@pytest.mark.parametrize("case", list(_bad_evaluation_arguments("P", "W")))
def test_weights_that_would_not_be_evaluated_and_other_bad_arguments_are_usage_errors(case, photos, tiny_weights,
                                                                                      capsys, monkeypatch):
    def no_evaluating(*args, **kwargs):
        raise AssertionError("evaluated despite a usage mistake")

    monkeypatch.setattr(evaluate, "evaluate_task", no_evaluating)
    bad = _bad_evaluation_arguments(photos, tiny_weights)[case]
    with pytest.raises(SystemExit) as refused:
        evaluate.main(["--data", str(photos), "--tasks", "denoising", "--settings", "noise15", "--no-cache",
                       "--no-timing", "--threads", "1", *bad])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m training.evaluate: error: ")


def test_unreadable_weights_are_named_in_one_line(photos, tmp_path):
    torn = tmp_path / "denoising.safetensors"
    torn.write_bytes(b"not safetensors")
    with pytest.raises(SystemExit) as refused:
        evaluate.main(["--data", str(photos), "--tasks", "denoising", "--settings", "noise15", "--no-cache",
                       "--no-timing", "--threads", "1", "--weights", f"denoising={torn}"])
    assert isinstance(refused.value.code, str) and str(torn) in refused.value.code


@pytest.fixture
def card_of_tiny_kodak(photos, tiny_weights, tmp_path, monkeypatch):
    """The card's evaluation as if ``photos`` were Kodak24 and ``tiny_weights`` the bundled weights,
    with one row per task so that the full evaluation stays quick; the card written is a copy."""
    card = tmp_path / "CARD.md"
    start, end = markers("eval-table")
    card.write_text(f"before\n{start}\nthe full table\n{end}\nafter\n")
    monkeypatch.setattr(evaluate, "write_card", lambda text: evaluate.replace_section("eval-table", text, card))
    monkeypatch.setattr(evaluate, "KODAK", photos)
    monkeypatch.setattr(evaluate, "bundled_path", lambda task: tiny_weights)
    monkeypatch.setattr(evaluate, "CBM3D_CACHE", tmp_path / "no-cbm3d.json")
    monkeypatch.setattr(evaluate, "SETTINGS", tuple(s for s in evaluate.SETTINGS
                                                    if s.key in ("noise15", "shake", "rain")))
    return card


@pytest.mark.parametrize("part", [["--tasks", "denoising"], ["--settings", "noise15", "shake", "rain"],
                                  ["--limit", "1"], ["--data", "{other_photos}"],
                                  ["--weights", "denoising={other_weights}"]])
def test_write_card_refuses_a_part_of_the_evaluation(part, card_of_tiny_kodak, photos, tmp_path, capsys):
    other_photos = tmp_path / "other"
    other_photos.mkdir()
    for photo in photos.iterdir():
        (other_photos / photo.name).write_bytes(photo.read_bytes())
    torch.manual_seed(2)
    other_weights = tmp_path / "other.safetensors"
    save_safetensors(TINY.build(), other_weights)
    part = [item.format(other_photos=other_photos, other_weights=other_weights) for item in part]
    with pytest.raises(SystemExit) as refused:
        evaluate.main(["--write-card", "--no-cache", "--no-timing", "--threads", "1", *part])
    assert refused.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--write-card" in error and part[0] in error
    assert "the full table" in card_of_tiny_kodak.read_text()


def test_write_card_regenerates_the_full_evaluation(card_of_tiny_kodak, tiny_weights, capsys):
    # Naming the bundled file itself is still the full evaluation.
    assert evaluate.main(["--write-card", "--no-cache", "--no-timing", "--threads", "1",
                          "--weights", f"denoising={tiny_weights}"]) == 0
    printed = capsys.readouterr().out.strip()
    start, end = markers("eval-table")
    assert card_of_tiny_kodak.read_text() == f"before\n{start}\n{printed}\n{end}\nafter\n"
    assert all(f"| {task} |" in printed for task in ("denoising", "deblurring", "deraining"))
