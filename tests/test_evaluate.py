"""The evaluation script that regenerates the model card's table, run on a tiny real network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import MPRNetConfig, save_safetensors
from training import evaluate
from training.card import markers

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


def test_table_lists_every_setting_of_the_task_and_writes_the_card(photos, tiny_weights, tmp_path, capsys,
                                                                  monkeypatch):
    card = tmp_path / "CARD.md"
    start, end = markers("eval-table")
    card.write_text(f"before\n{start}\nold table\n{end}\nafter\n")
    monkeypatch.setattr(evaluate, "CBM3D_CACHE", tmp_path / "no-cbm3d.json")
    out = tmp_path / "results.json"
    assert evaluate.main(["--data", str(photos), "--tasks", "deblurring", "--threads", "1",
                          "--weights", f"deblurring={tiny_weights}", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| deblurring |")]
    assert len(rows) == 5 and "camera-shake trajectories" in rows[0] and "mild camera shake" in rows[1]
    assert ["linear motion" in rows[2], "defocus" in rows[3], "Gaussian blur" in rows[4]] == [True] * 3

    results = json.loads(out.read_text())["deblurring"]
    assert set(results["settings"]) == {"shake", "mild_shake", "linear_motion", "defocus", "gaussian_blur"}
    for per_image in results["settings"].values():
        assert [r["image"] for r in per_image] == ["kodim00", "kodim01"]
        assert all(0 < r["ssim"] <= 1 and r["input_psnr"] > 10 for r in per_image)
        assert all(0 < r["classic_ssim"] <= 1 and r["classic_psnr"] > 10 for r in per_image)
    classic = [line for line in printed.splitlines() if line.startswith("| ") and "unsharp mask" in line]
    assert len(classic) == 5

    # --write-card replaces only the marked section of the card.
    evaluate.write_card("new table", card)
    assert card.read_text() == f"before\n{start}\nnew table\n{end}\nafter\n"
