"""The GPU fast path's switches, checked on whatever device is here with a tiny real MPRNet:
channels-last, torch.compile, CUDA graphs, automatic sizing, out-of-memory split-and-retry."""

from __future__ import annotations

import argparse
import os

import httpx
import numpy as np
import pytest
import torch

from models import MPRNet
from service.config import Settings, add_serve_arguments, settings_from_args
from service.engine import Engine, default_batch_size, is_out_of_memory
from service.tiling import DEFAULT_TILE_SIZE, Tiling

from service_helpers import TINY_ARCHITECTURE, decode_png, encode, random_image

pytestmark = pytest.mark.timeout(300)  # hangs fail; a slow shared CI machine does not

ON_CUDA = torch.cuda.is_available()
TILES = Tiling(32, overlap=8)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(11)
    return MPRNet(**TINY_ARCHITECTURE).eval()


def _tiles(count: int, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, side, side), dtype=np.float32)


def _conv_weight(engine: Engine) -> torch.Tensor:
    return next(p for p in engine.model.parameters() if p.ndim == 4)


def test_channels_last_gives_the_nchw_layouts_output(tiny_model):
    tiles = _tiles(3)
    nchw = Engine(tiny_model, device="cpu", tile_size=32, channels_last=False)
    assert not _conv_weight(nchw).is_contiguous(memory_format=torch.channels_last)
    expected, image = nchw.forward(tiles), random_image(70, 50, seed=3)
    expected_image = TILES.restore(image, nchw.forward)
    nhwc = Engine(tiny_model, device="cpu", tile_size=32, channels_last=True)
    assert _conv_weight(nhwc).is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(nhwc.forward(tiles), expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(TILES.restore(image, nhwc.forward), expected_image)
    # The same module handed back to an NCHW engine is converted back, not left in NHWC.
    again = Engine(tiny_model, device="cpu", tile_size=32, channels_last=False)
    assert not _conv_weight(again).is_contiguous(memory_format=torch.channels_last)


def test_channels_last_is_the_cpu_default(tiny_model):
    engine = Engine(tiny_model, device="cpu", tile_size=32)
    assert engine.channels_last and engine.describe()["channels_last"] is True
    assert _conv_weight(engine).is_contiguous(memory_format=torch.channels_last)


def test_bf16_runs_on_the_cpu_close_to_fp32(tiny_model):
    tiles = _tiles(2, seed=7)
    fp32 = Engine(tiny_model, device="cpu", tile_size=32).forward(tiles)
    # Where the CPU has no bf16 instructions it is emulated: allowed here, since closeness is the point.
    bf16 = Engine(tiny_model, device="cpu", tile_size=32, precision="bf16",
                  allow_emulated_precision=True).forward(tiles)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    # bf16 keeps 8 mantissa bits; a tiny random network's output stays within a few 8-bit levels.
    assert 0 < np.abs(bf16 - fp32).max() < 0.05


class _AllocatorLimit:
    """Stands in for a device whose memory holds at most ``limit`` tiles: larger batches raise the
    allocator's error, smaller ones run the real network."""

    def __init__(self, run, limit: int, error: type[BaseException] = torch.OutOfMemoryError):
        self.run, self.limit, self.error, self.sizes = run, limit, error, []

    def __call__(self, network, batch):
        self.sizes.append(len(batch))
        if len(batch) > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.run(network, batch)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_out_of_memory_splits_the_batch_and_retries(tiny_model, error):
    engine = Engine(tiny_model, device="cpu", tile_size=32)
    tiles = _tiles(7, seed=1)
    expected = engine.forward(tiles)
    limit = _AllocatorLimit(engine._run, limit=2, error=error)
    engine._run = limit
    restored = engine.forward(tiles)
    # Batched convolutions may sum in another order; far under a grey level.
    np.testing.assert_allclose(restored, expected, atol=1e-5, rtol=0)
    assert max(size for size in limit.sizes if size <= 2) == 2  # halves are retried, not single tiles at once
    assert sum(size for size in limit.sizes if size <= 2) == 7  # every tile ran exactly once
    assert engine.oom_splits == 3  # 7 -> 3 + 4, 3 -> 1 + 2, 4 -> 2 + 2


def test_out_of_memory_on_a_single_tile_and_other_errors_are_raised(tiny_model):
    engine = Engine(tiny_model, device="cpu", tile_size=32)
    engine._run = _AllocatorLimit(engine._run, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        engine.forward(_tiles(4))
    assert engine.oom_splits == 2  # 4 -> 2 + 2, the first 2 -> 1 + 1, and the first 1 fails

    def broken(network, batch):
        raise RuntimeError("Given groups=1, weight of size [8, 3, 3, 3], expected input to have 3 channels")

    engine.oom_splits = 0
    engine._run = broken
    with pytest.raises(RuntimeError, match="groups"):
        engine.forward(_tiles(4))
    assert engine.oom_splits == 0
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.skipif(ON_CUDA, reason="checks the CPU's fallback; CUDA sizes from its free memory")
def test_auto_sizes_are_the_defaults_on_the_cpu(tiny_model):
    engine = Engine(tiny_model, device="cpu")
    assert engine.choose_sizes() == (DEFAULT_TILE_SIZE, default_batch_size("cpu")) == (DEFAULT_TILE_SIZE, 1)


@pytest.mark.skipif(not ON_CUDA, reason="auto sizing measures CUDA memory")
def test_auto_sizes_fit_the_free_device_memory(tiny_model):
    tile_size, batch = Engine(tiny_model, device="cuda").choose_sizes()
    assert tile_size % 8 == 0 and 1 <= batch <= 64
    Engine(tiny_model, device="cuda", tile_size=tile_size, max_batch_size=batch).warmup(batch)


@pytest.mark.skipif(ON_CUDA, reason="checks the refusal where there is no CUDA")
def test_cuda_graphs_are_refused_on_the_cpu(tiny_model):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Engine(tiny_model, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_give_the_eager_output(tiny_model):
    tiles = _tiles(3, side=64)
    eager = Engine(tiny_model, device="cuda", tile_size=64, max_batch_size=4)
    graphed = Engine(tiny_model, device="cuda", tile_size=64, max_batch_size=4, cuda_graphs=True)
    graphed.warmup()
    assert sorted(graphed._graphs) == [1, 2, 4]
    np.testing.assert_allclose(graphed.forward(tiles), eager.forward(tiles), atol=1e-4, rtol=0)


def test_fast_path_batch_shapes_are_powers_of_two_and_the_largest(tiny_model):
    assert Engine(tiny_model, device="cpu", max_batch_size=6).batch_shapes() == [1, 2, 4, 6]
    assert Engine(tiny_model, device="cpu", max_batch_size=1).batch_shapes() == [1]


@pytest.mark.skipif(not ON_CUDA and os.environ.get("MPRNET_TEST_CPU_COMPILE") != "1",
                    reason="torch.compile on the CPU builds C++ kernels: a tiny model did not finish in 240 s on "
                           "this 2-core machine; on CUDA, "
                           "or with MPRNET_TEST_CPU_COMPILE=1, it runs")
def test_compiled_engine_matches_eager_and_compiles_only_at_warmup(tiny_model):
    device = "cuda" if ON_CUDA else "cpu"
    eager = Engine(tiny_model, device=device, tile_size=32, max_batch_size=2)
    compiled = Engine(tiny_model, device=device, tile_size=32, max_batch_size=2, compile=True)
    compiled.warmup()
    tiles = _tiles(1, seed=4)
    from torch._dynamo.utils import counters
    frames = counters["stats"]["unique_graphs"]
    np.testing.assert_allclose(compiled.forward(tiles), eager.forward(tiles), atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == frames  # the request paid for no compilation


def test_fast_path_settings_parse_from_flags_and_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--channels-last", "true", "--compile", "1",
                                                     "--auto-size", "yes"]))
    assert (settings.channels_last, settings.compile, settings.cuda_graphs, settings.auto_size) == (
        True, True, False, True)
    monkeypatch.setenv("MPRNET_CUDA_GRAPHS", "true")
    assert Settings().cuda_graphs is True
    defaults = Settings(_env_file=None, cuda_graphs=False)
    assert (defaults.channels_last, defaults.compile, defaults.auto_size) == (None, False, False)


def test_batch_size_defaults_to_one_on_the_cpu_and_four_on_cuda(tiny_model):
    assert Settings(_env_file=None, device="cpu").max_batch_size == 1
    assert Settings(_env_file=None, device="cuda:1").max_batch_size == 4  # read from the name; not loaded
    assert Settings(_env_file=None, devices="cpu,cuda:0").max_batch_size == 1  # the first device's
    assert Settings(_env_file=None, device="auto").max_batch_size == (4 if torch.cuda.is_available() else 1)
    assert Settings(_env_file=None, device="cpu", max_batch_size=3).max_batch_size == 3
    engine = Engine(tiny_model, device="cpu", tile_size=32)
    assert engine.max_batch_size == default_batch_size("cpu") == 1 and default_batch_size("cuda") == 4


def test_service_serves_with_channels_last_and_auto_size_on_the_cpu(tiny_weights, start_server):
    checkpoint = tiny_weights(5)
    settings = Settings(tasks="denoising", weights_denoising=checkpoint, device="cpu", tile_size=32,
                        tile_overlap=8, max_batch_size=4, max_pixels=64 * 64, max_queued_tiles=64,
                        channels_last=True, auto_size=True, backend="torch")  # PyTorch's switches
    image = random_image(40, 56, seed=6)
    running = start_server(settings)
    engine = running.service.workers["cpu"]["denoising"]
    # On the CPU auto sizing leaves the configured sizes alone.
    assert (engine.tile_size, engine.max_batch_size, engine.channels_last) == (32, 4, True)
    response = httpx.post(f"{running.url}/v1/restore/denoising",
                          files={"image": ("a.png", encode(image), "application/octet-stream")}, timeout=60)
    assert response.status_code == 200, response.text
    served = np.asarray(decode_png(response.content))
    reference = TILES.restore(image, Engine.from_checkpoint(checkpoint, device="cpu", tile_size=32).forward)
    assert np.abs(served.astype(int) - reference).max() <= 1


def test_fast_path_pads_partial_batches_of_the_serving_tile_and_leaves_other_shapes_alone(tiny_model):
    engine = Engine(tiny_model, device="cpu", tile_size=32, max_batch_size=4, compile=True)
    # Compiling is out of reach on this CPU (see the compile test); what is checked here is the
    # routing around it, so the fast path runs the eager network behind a wrapper of its own.
    engine._fast_model = torch.nn.Sequential(engine.model)
    seen = []

    def recording(network, batch):
        seen.append((network is engine._fast_model, len(batch), tuple(batch.shape[2:])))
        return Engine._run(engine, network, batch)

    engine._run = recording
    tiles = _tiles(3, seed=8)
    reference = Engine(tiny_model, device="cpu", tile_size=32).forward(tiles)
    np.testing.assert_allclose(engine.forward(tiles), reference, atol=1e-5, rtol=0)
    engine.forward(_tiles(2, side=40))
    assert seen == [(True, 4, (32, 32)), (False, 2, (40, 40))]
