"""The OpenVINO runner against the PyTorch engine it stands in for, its shape cache and its disk cache."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from models import MPRNet, load_model  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.openvino_runner import OpenVinoRunner, openvino_available  # noqa: E402

TINY = dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, reduction=2)
TILE = 64
# Made-up digests: the runner only uses them as cache keys.
SHA_A = "a" * 64
SHA_B = "b" * 64


def _tiny_model(seed: int) -> MPRNet:
    torch.manual_seed(seed)
    return MPRNet(**TINY).eval()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _tiles(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def model_a():
    return _tiny_model(7)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def runner(model_a, cache_dir):
    """Batches of up to 3 tiles but only 2 static shapes kept, so the cache has to evict."""
    built = OpenVinoRunner(model_a, weights_sha256=SHA_A, tile_size=TILE, max_batch_size=3, threads=2,
                           cache_dir=cache_dir, max_static_shapes=2)
    built.warmup(1)
    return built


@pytest.fixture(scope="module")
def engine_a(model_a, runner):
    # Built after the runner on purpose: Engine turns the module channels-last in place, and the
    # runner must not depend on the layout its module arrives in (the disk-cache test rebuilds it).
    return Engine(model_a, device="cpu", tile_size=TILE, max_batch_size=3)


def test_the_backend_reports_itself_available():
    assert openvino_available() is None


@pytest.mark.parametrize("shape", [
    (1, 3, TILE, TILE),   # the serving tile, static-shape model
    (3, 3, TILE, TILE),   # a full batch
    (5, 3, TILE, TILE),   # more than max_batch_size: run in slices
    (1, 3, 8, 8),         # the smallest image, on the dynamic model
    (1, 3, 8, 16),        # 8 px high: the height where converting without ONNX goes wrong
    (2, 3, 40, 96),       # a small image wider than a tile's side
])
def test_outputs_agree_with_the_pytorch_engine(runner, engine_a, shape):
    tiles = _tiles(shape, seed=shape[0] + shape[2])
    restored = runner.forward(tiles)
    assert restored.shape == tiles.shape and restored.dtype == np.float32
    assert restored.min() >= 0 and restored.max() <= 1
    assert _psnr(restored, engine_a.forward(tiles)) >= 50


def test_the_static_shape_cache_stays_bounded_and_keeps_the_most_recent(runner, engine_a):
    for batch in (1, 2, 3, 2):
        runner.forward(_tiles((batch, 3, TILE, TILE)))
    assert runner.static_shapes == [(3, TILE, TILE), (2, TILE, TILE)]
    runner.forward(_tiles((2, 3, 24, 32)))  # off the tile side: the dynamic model, no static entry
    assert runner.static_shapes == [(3, TILE, TILE), (2, TILE, TILE)]
    evicted_and_back = _tiles((1, 3, TILE, TILE), seed=3)
    assert _psnr(runner.forward(evicted_and_back), engine_a.forward(evicted_and_back)) >= 50
    assert runner.static_shapes == [(2, TILE, TILE), (1, TILE, TILE)]


def test_forward_from_a_worker_thread_and_concurrently(runner, engine_a):
    batches = [_tiles((1, 3, TILE, TILE), seed=seed) for seed in range(4)]
    results: dict[int, np.ndarray] = {}
    workers = [threading.Thread(target=lambda i=i: results.__setitem__(i, runner.forward(batches[i])))
               for i in range(len(batches))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for i, batch in enumerate(batches):
        assert _psnr(results[i], engine_a.forward(batch)) >= 50


def test_bad_shapes_are_refused(runner):
    with pytest.raises(ValueError, match="divisible by 8"):
        runner.forward(_tiles((1, 3, 60, 64)))
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        runner.forward(_tiles((3, TILE, TILE)))


def test_describe_names_the_backend_and_fp32(runner):
    described = runner.describe()
    assert described["backend"] == "openvino"
    assert described["precision"] == "fp32" and described["inference_precision"] == "f32"
    assert described["tile_size"] == TILE and described["max_batch_size"] == 3
    assert runner.probe_psnr_db >= 50


def test_a_second_start_reuses_the_disk_cache(runner, model_a, cache_dir):
    assert not runner.converted_from_cache
    # Each shape's first compile was new; a shape compiled again after eviction came from the disk.
    seen: set[tuple] = set()
    for entry in runner.compile_log:
        assert entry["from_cache"] == (tuple(entry["shape"]) in seen), entry
        seen.add(tuple(entry["shape"]))
    files_before = _files_under(cache_dir)
    second = OpenVinoRunner(model_a, weights_sha256=SHA_A, tile_size=TILE, max_batch_size=3, threads=2,
                            cache_dir=cache_dir, max_static_shapes=2)
    second.warmup(1)
    assert second.converted_from_cache
    assert second.probe_psnr_db is None, "a cached conversion is not re-checked by running PyTorch"
    assert second.conversion_seconds < runner.conversion_seconds
    assert [entry["from_cache"] for entry in second.compile_log] == [True, True]  # dynamic, then the tile
    assert _files_under(cache_dir) == files_before, "nothing new was converted or compiled"
    tiles = _tiles((1, 3, TILE, TILE), seed=11)
    assert np.array_equal(second.forward(tiles), runner.forward(tiles))


def test_other_weights_do_not_reuse_the_disk_cache(runner, cache_dir):
    model_b = _tiny_model(8)
    other = OpenVinoRunner(model_b, weights_sha256=SHA_B, tile_size=TILE, max_batch_size=3, threads=2,
                           cache_dir=cache_dir)
    other.warmup(1)
    assert not other.converted_from_cache
    assert not any(entry["from_cache"] for entry in other.compile_log)
    tiles = _tiles((1, 3, TILE, TILE), seed=12)
    assert _psnr(other.forward(tiles), Engine(model_b, device="cpu", tile_size=TILE).forward(tiles)) >= 50
    assert _psnr(other.forward(tiles), runner.forward(tiles)) < 40, "model B is not model A"


def test_a_mislabelled_digest_does_not_reuse_another_models_conversion(runner, cache_dir, tmp_path):
    # Different weights under the same digest (a caller's mistake): the cached conversion is keyed
    # on the tensors themselves too, so it is not reused. On a copy of the cache, which this extends.
    shutil.copytree(cache_dir, tmp_path, dirs_exist_ok=True)
    model_c = _tiny_model(9)
    replaced = OpenVinoRunner(model_c, weights_sha256=SHA_A, tile_size=TILE, threads=2, cache_dir=tmp_path)
    assert not replaced.converted_from_cache and replaced.probe_psnr_db >= 50
    tiles = _tiles((1, 3, TILE, TILE), seed=13)
    assert _psnr(replaced.forward(tiles), Engine(model_c, device="cpu", tile_size=TILE).forward(tiles)) >= 50


def test_attention_pooled_over_windows_converts_and_is_not_the_same_weights_conversion(runner, cache_dir, tmp_path):
    # The same tensors pooled another way are another graph: a cached conversion of model A (same
    # digest, same weights) must not be reused, and the converted windows must match PyTorch's,
    # on the serving tile and on odd sizes whose grid cells do not divide them.
    shutil.copytree(cache_dir, tmp_path, dirs_exist_ok=True)
    local = _tiny_model(7)
    local.pool_attention_locally(32)
    converted = OpenVinoRunner(local, weights_sha256=SHA_A, tile_size=TILE, threads=2, cache_dir=tmp_path)
    assert not converted.converted_from_cache and converted.probe_psnr_db >= 50
    engine = Engine(local, device="cpu", tile_size=TILE)
    for shape in [(1, 3, TILE, TILE), (1, 3, 40, 96)]:
        tiles = _tiles(shape, seed=14)
        tiles[..., : shape[-1] // 2] *= 0.1  # dark and bright sides, so the windows disagree
        assert _psnr(converted.forward(tiles), engine.forward(tiles)) >= 50
    tiles = _tiles((1, 3, TILE, TILE), seed=14)
    tiles[..., : TILE // 2] *= 0.1
    assert _psnr(converted.forward(tiles), runner.forward(tiles)) < 90, "pooling over windows changed nothing"


def test_the_reference_demo_pipeline_within_one_grey_level(conformance_dir):
    demo = np.load(conformance_dir / "deraining_random_demo_equivalent.npz")
    model = load_model(conformance_dir / "deraining_random_official_format.pth")
    runner = OpenVinoRunner(model, weights_sha256="deraining-random-conformance", threads=2)
    image = demo["input_uint8"]
    height, width = image.shape[:2]
    # The demo: scale to [0, 1], reflect-pad bottom and right to a multiple of 8, stage 3, clamp
    # (inside the runner), crop, round to 8 bits with ties to even.
    chw = image.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    padded = np.pad(chw, ((0, 0), (0, -height % 8), (0, -width % 8)), mode="reflect")
    restored = runner.forward(padded[None])[0, :, :height, :width]
    output = np.rint(restored.transpose(1, 2, 0) * 255).astype(np.uint8)
    difference = np.abs(output.astype(int) - demo["output_uint8"])
    assert difference.max() <= 1


def test_converting_reports_nothing_to_openvinos_telemetry(monkeypatch, tmp_path):
    # openvino.convert_model reports each call to Intel's telemetry (Google Analytics) unless the
    # user has opted out: a service that converted at start-up phoned home, forking 17 processes.
    telemetry = pytest.importorskip("openvino_telemetry")
    reported = []
    for method in ("send_event", "start_session", "end_session", "send_error"):
        if hasattr(telemetry.Telemetry, method):
            monkeypatch.setattr(telemetry.Telemetry, method,
                                lambda self, *args, _method=method, **kwargs: reported.append((_method, args)))
    runner = OpenVinoRunner(_tiny_model(3), weights_sha256="c" * 64, tile_size=TILE, threads=1, cache_dir=tmp_path)
    assert not runner.converted_from_cache
    assert reported == []
