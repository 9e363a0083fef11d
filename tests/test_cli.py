"""The offline CLI, run as users run it: `python -m service restore ...` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from models import MPRNet, save_safetensors
from service.engine import Engine
from service.image_files import find_images
from service.tiling import Tiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, reduction=2)


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "service", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_safetensors(MPRNet(**TINY), path)
    return path


def _write(path, height, width, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_find_images_lists_files_as_given_and_folders_sorted_and_names_what_yielded_nothing(tmp_path):
    (tmp_path / "in" / "nested").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for name in ("in/b.PNG", "in/nested/a.tiff", "in/notes.txt", "given.txt"):
        (tmp_path / name).write_bytes(b"")
    files, problems = find_images([tmp_path / "in", tmp_path / "given.txt", tmp_path / "empty", tmp_path / "gone"])
    assert files == [tmp_path / "in" / "b.PNG", tmp_path / "in" / "nested" / "a.tiff", tmp_path / "given.txt"]
    assert problems == [f"{tmp_path / 'empty'}: no images in this folder",
                        f"{tmp_path / 'gone'}: no such file or folder"]


def test_restores_files_and_folders_and_skips_what_it_cannot_read(tmp_path, weights):
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    first = _write(inputs / "first.png", 40, 56, 0)
    _write(inputs / "nested" / "second.jpg", 33, 17, 1)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    loose = tmp_path / "loose.bmp"
    _write(loose, 9, 9, 2)
    out = tmp_path / "out"
    result = _run("restore", inputs, loose, "-o", out, "--task", "denoising", "--weights", weights,
                  "--tile", "32", "--overlap", "8")
    assert result.returncode == 1, result.stderr
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["first.png", "loose.png", "second.png"]
    assert Image.open(out / "second.png").size == (17, 33)
    expected = Tiling(32, overlap=8).restore(first, Engine.from_checkpoint(weights, device="cpu", tile_size=32).forward)
    assert np.array_equal(np.asarray(Image.open(out / "first.png")), expected)


def test_all_good_files_exit_zero(tmp_path, weights):
    _write(tmp_path / "only.png", 16, 24, 4)
    result = _run("restore", tmp_path / "only.png", "-o", tmp_path / "out", "--task", "deraining",
                  "--weights", weights, "--tile", "0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "only.png").is_file()


def test_missing_weights_say_which_file_and_how_to_install(tmp_path):
    _write(tmp_path / "x.png", 8, 8, 5)
    result = _run("restore", tmp_path / "x.png", "-o", tmp_path / "out", "--task", "deblurring",
                  "--weights", tmp_path / "nowhere.pth")
    assert result.returncode == 2 and "nowhere.pth" in result.stderr and "Traceback" not in result.stderr


def test_restoring_a_folder_into_itself_never_overwrites_an_input(tmp_path, weights):
    folder = tmp_path / "photos"
    folder.mkdir()
    _write(folder / "photo.png", 12, 12, 6)
    _write(folder / "scan.jpg", 12, 12, 7)
    original = (folder / "photo.png").read_bytes()
    result = _run("restore", folder, "-o", folder, "--task", "denoising", "--weights", weights, "--tile", "0")
    assert result.returncode == 1, result.stderr
    assert f"its result {folder / 'photo.png'} would overwrite the input" in result.stderr
    assert (folder / "photo.png").read_bytes() == original
    assert sorted(p.name for p in folder.iterdir()) == ["photo.png", "scan.jpg", "scan.png"]


@pytest.mark.parametrize("problem", ["output is a file", "unknown device"])
def test_usage_mistakes_exit_2_with_one_line_not_a_traceback(tmp_path, weights, problem):
    _write(tmp_path / "x.png", 8, 8, 8)
    (tmp_path / "taken.png").write_bytes(b"")
    output, device = (tmp_path / "taken.png", "cpu") if problem == "output is a file" else (tmp_path / "out", "tpu")
    result = _run("restore", tmp_path / "x.png", "-o", output, "--task", "denoising", "--weights", weights,
                  "--device", device)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert ("takes a folder" if problem == "output is a file" else "'tpu' is not one") in result.stderr


def test_an_output_folder_inside_the_input_folder_is_not_taken_for_more_photos_on_a_rerun(tmp_path, weights):
    folder = tmp_path / "photos"
    folder.mkdir()
    _write(folder / "photo.png", 12, 12, 9)
    out = folder / "restored"
    for attempt in range(2):
        result = _run("restore", folder, folder / "photo.png", "-o", out, "--task", "denoising",
                      "--weights", weights, "--tile", "0")
        # The photo named twice (once in its folder) is restored once, not reported as a clash.
        assert result.returncode == 0, (attempt, result.stderr)
        assert sorted(p.name for p in out.iterdir()) == ["photo.png"]
