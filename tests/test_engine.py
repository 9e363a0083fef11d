"""The device engine with tiling around it: the reference demo's pipeline, tiling, odd sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import MPRNet
from service import tiling
from service.engine import Engine
from service.tiling import Tiling

TINY = dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, reduction=2)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(7)
    return MPRNet(**TINY).eval()


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _smooth_image(height, width):
    y, x = np.mgrid[0:height, 0:width]
    channels = [np.sin(x / 9.0) + np.cos(y / 7.0), np.sin((x + y) / 11.0), np.cos(x / 5.0) * np.sin(y / 13.0)]
    return np.rint((np.stack(channels, -1) + 2) / 4 * 255).astype(np.uint8)


def _demo_difference(conformance_dir) -> np.ndarray:
    demo = np.load(conformance_dir / "deraining_random_demo_equivalent.npz")
    engine = Engine.from_checkpoint(conformance_dir / "deraining_random_official_format.pth", device="cpu",
                                    tile_size=0)
    restored = Tiling(tile_size=0).restore(demo["input_uint8"], engine.forward)
    assert restored.shape == demo["output_uint8"].shape and restored.dtype == np.uint8
    return np.abs(restored.astype(int) - demo["output_uint8"])


def test_untiled_engine_reproduces_the_reference_demo_within_one_level(conformance_dir):
    # Guards the pipeline (padding side and mode, stage, clamp, crop, rounding): each wrong choice
    # moves the mean difference to 1.3-8 grey levels and the largest to 60-120.
    assert _demo_difference(conformance_dir).max() <= 1


def test_an_image_that_fits_one_tile_gives_exactly_the_untiled_result(tiny_model):
    image = _image(61, 93)
    engine = Engine(tiny_model, device="cpu")
    untiled = Tiling(tile_size=0).restore(image, engine.forward)
    tiled = Tiling(tile_size=96, overlap=16).restore(image, engine.forward)
    assert np.array_equal(untiled, tiled)


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (8, 8), (1000, 3), (3, 1000), (2, 9)])
@pytest.mark.parametrize("tile_size", [0, 64])
def test_odd_sizes_come_back_at_their_size(tiny_model, size, tile_size):
    engine = Engine(tiny_model, device="cpu", tile_size=tile_size)
    restored = Tiling(tile_size, overlap=16).restore(_image(*size), engine.forward)
    assert restored.shape == (*size, 3) and restored.dtype == np.uint8


def test_tiles_of_one_image_share_one_shape_and_cover_it():
    plan, tiles = Tiling(64, overlap=16).cut(_image(130, 201))
    assert tiles.shape == (len(plan), 3, 64, 64) and tiles.dtype == np.float32
    covered = np.zeros((plan.padded_height, plan.padded_width), dtype=bool)
    for y, x in plan.origins:
        covered[y:y + 64, x:x + 64] = True
    assert covered.all()
    ys = sorted({y for y, _ in plan.origins})
    assert all(b - a <= 64 - 16 for a, b in zip(ys, ys[1:])), "neighbours overlap by at least the overlap"


def test_tiling_is_close_to_the_whole_image(tiny_model):
    image = _smooth_image(200, 264)
    engine = Engine(tiny_model, device="cpu")
    whole = Tiling(tile_size=0).restore(image, engine.forward).astype(float)
    tiled = Tiling(96, overlap=32).restore(image, engine.forward).astype(float)
    psnr = 10 * np.log10(255 ** 2 / np.mean((whole - tiled) ** 2))
    assert psnr > 30, psnr


def test_blending_cross_fades_instead_of_leaving_seams():
    # Tiles that disagree by a constant (what a network does near tile borders) must fade into
    # each other across the overlap: no step larger than the disagreement spread over it.
    plan = tiling.plan_tiles(200, 300, 64, 16)
    offsets = np.random.default_rng(0).uniform(0, 1, len(plan)).astype(np.float32)
    tiles = np.broadcast_to(offsets[:, None, None, None], (len(plan), 1, 64, 64)).copy()
    merged = tiling.merge(tiles, plan)[0]
    largest_step = max(np.abs(np.diff(merged, axis=0)).max(), np.abs(np.diff(merged, axis=1)).max())
    hard_seam = np.abs(np.diff(offsets)).max()
    assert largest_step < hard_seam * 0.2, (largest_step, hard_seam)
    assert merged.min() >= offsets.min() - 1e-6 and merged.max() <= offsets.max() + 1e-6


def test_merge_is_the_identity_on_tiles_of_one_image():
    rng = np.random.default_rng(3)
    image = rng.random((3, 75, 130), dtype=np.float32)
    plan = tiling.plan_tiles(75, 130, 32, 8)
    tiles = tiling.cut(tiling.pad_to_multiple(image), plan)
    np.testing.assert_allclose(tiling.merge(tiles, plan), image, atol=1e-6)


def test_padding_reflects_like_the_reference_and_handles_tiny_sides():
    image = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    padded = tiling.pad_to_multiple(image)
    assert padded.shape == (2, 8, 8)
    np.testing.assert_array_equal(padded[:, :5, :3], image)
    np.testing.assert_array_equal(padded[:, 5, :3], image[:, 3])  # reflection excludes the edge row
    single = tiling.pad_to_multiple(np.ones((3, 1, 1), dtype=np.float32))
    assert single.shape == (3, 8, 8) and (single == 1).all()


def test_invalid_settings_are_refused(tiny_model):
    with pytest.raises(ValueError, match="multiple of 8"):
        Engine(tiny_model, device="cpu", tile_size=100)
    with pytest.raises(ValueError, match="multiple of 8"):
        Tiling(100)
    with pytest.raises(ValueError, match="overlap"):
        Tiling(64, overlap=32)
    with pytest.raises(ValueError, match="overlap"):
        Tiling(64, overlap=-1)
    with pytest.raises(ValueError, match="precision"):
        Engine(tiny_model, device="cpu", precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            Engine(tiny_model, device="cpu", precision="fp16")
        with pytest.raises(ValueError, match="no usable CUDA"):
            Engine(tiny_model, device="cuda")


def test_a_cuda_device_number_past_the_machines_gpus_is_refused_in_one_line(monkeypatch):
    from service.devices import resolve_device
    if not torch.cuda.is_available():  # a one-GPU machine, as far as these checks can tell
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"has {count} CUDA device.*cuda:0 to cuda:{count - 1}"):
        resolve_device(f"cuda:{count}")
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)


def test_auto_device_is_cuda_only_when_present(tiny_model):
    engine = Engine(tiny_model, device="auto", tile_size=0)
    assert engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_batches_give_the_same_result_as_single_tiles(tiny_model):
    engine, tiles = Engine(tiny_model, device="cpu", tile_size=64), Tiling(64, overlap=16)
    image = _image(150, 150, seed=5)
    # Batched convolutions may sum in another order: a grey level at most, and rarely.
    single = tiles.restore(image, engine.forward, batch_size=1)
    batched = tiles.restore(image, engine.forward, batch_size=5)
    difference = np.abs(single.astype(int) - batched)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
