"""The GPU fast path's switches, checked on whatever device is here with a tiny real MPRNet:
channels-last, torch.compile, CUDA graphs, automatic sizing, out-of-memory split-and-retry."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from bench import fastpath_check
from models import MPRNet
from service import engine as engine_module
from service.config import Settings, add_serve_arguments, settings_from_args
from service.engine import Engine, default_batch_size, is_out_of_memory
from service.tiling import DEFAULT_TILE_SIZE, Tiling

from service_helpers import ROOT, TINY_ARCHITECTURE, decode_png, encode, random_image

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
    engine = Engine(tiny_model, device="cuda")
    tile_size, batch = engine.choose_sizes()
    assert tile_size % 8 == 0 and 1 <= batch <= 64
    assert 0 < engine.bytes_per_pixel < 1e5  # what the sizes came from: a tiny network's activations
    Engine(tiny_model, device="cuda", tile_size=tile_size, max_batch_size=batch).warmup(batch)


@pytest.mark.skipif(ON_CUDA, reason="checks the refusal where there is no CUDA")
def test_cuda_graphs_are_refused_on_the_cpu(tiny_model):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Engine(tiny_model, device="cpu", cuda_graphs=True)


@pytest.fixture
def without_tf32():
    """fp32 convolutions and matrix products in full fp32, so two ways of running them agree closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _last_cuda_device() -> torch.device:
    # The last one: where there are several, capturing on device 0's streams would show.
    return torch.device("cuda", torch.cuda.device_count() - 1)


class _RecordedGraphs:
    """Stands in for torch.cuda.graph: records each capture's options, passes it to the real one,
    and can fail the capture numbered ``fail_at`` after its work was recorded, as a capture that
    runs out of memory at its end does."""

    def __init__(self, fail_at: int | None = None):
        self.real, self.options, self.fail_at = torch.cuda.graph, [], fail_at

    @contextlib.contextmanager
    def __call__(self, graph, **options):
        self.options.append(options)
        with self.real(graph, **options):
            yield
            if len(self.options) == self.fail_at:
                raise torch.OutOfMemoryError("CUDA out of memory (raised by the test at the end of a capture)")


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_capture_on_the_engines_device_and_stream_and_give_the_eager_output(tiny_model, monkeypatch,
                                                                                       without_tf32):
    device = _last_cuda_device()
    recorded = _RecordedGraphs()
    monkeypatch.setattr(torch.cuda, "graph", recorded)
    eager = Engine(tiny_model, device=device, tile_size=64, max_batch_size=4, cuda_graphs=False)
    graphed = Engine(tiny_model, device=device, tile_size=64, max_batch_size=4, cuda_graphs=True)
    current_device = torch.cuda.current_device()
    graphed.warmup()
    # Largest first, all on the engine's own side stream and into its one memory pool.
    assert list(graphed._graphs) == [4, 2, 1] and not graphed._failed_captures
    assert all(options["stream"] is graphed._capture_stream for options in recorded.options)
    assert graphed._capture_stream.device == device
    assert all(options["pool"] == graphed._graph_pool for options in recorded.options)
    # Capturing left the caller where it was: same device, its device's default stream, not capturing.
    assert torch.cuda.current_device() == current_device
    assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
    assert not torch.cuda.is_current_stream_capturing()
    # The graphs share memory: every size is replayed after the others, and each still gives eager's output.
    for count in (3, 1, 4, 2, 3):
        tiles = _tiles(count, side=64, seed=count)
        np.testing.assert_allclose(graphed.forward(tiles), eager.forward(tiles), atol=1e-5, rtol=0)
    assert len(recorded.options) == 3  # nothing captured after warm-up
    # Another engine on the device (another task) captures into the same pool, on the same stream.
    other = Engine(tiny_model, device=device, tile_size=64, max_batch_size=2, cuda_graphs=True)
    assert (other._graph_pool, other._capture_stream, other._graph_lock) == (
        graphed._graph_pool, graphed._capture_stream, graphed._graph_lock)
    other.warmup()
    tiles = _tiles(2, side=64, seed=9)
    np.testing.assert_allclose(other.forward(tiles), eager.forward(tiles), atol=1e-5, rtol=0)
    np.testing.assert_allclose(graphed.forward(tiles), eager.forward(tiles), atol=1e-5, rtol=0)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a CUDA device")
def test_a_failed_cuda_graph_capture_runs_that_batch_size_eagerly_without_capturing_again(tiny_model, monkeypatch,
                                                                                           caplog):
    device = _last_cuda_device()
    recorded = _RecordedGraphs(fail_at=1)
    monkeypatch.setattr(torch.cuda, "graph", recorded)
    eager = Engine(tiny_model, device=device, tile_size=64, max_batch_size=4, cuda_graphs=False)
    graphed = Engine(tiny_model, device=device, tile_size=64, max_batch_size=4, cuda_graphs=True)
    with caplog.at_level(logging.WARNING, logger="service.engine"):
        graphed.warmup()  # the first capture, of 4 tiles, fails
        assert list(graphed._failed_captures) == [4] and sorted(graphed._graphs) == [1, 2]
        assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
        assert not torch.cuda.is_current_stream_capturing()
        for count in (4, 3, 4, 2):
            tiles = _tiles(count, side=64, seed=count)
            np.testing.assert_allclose(graphed.forward(tiles), eager.forward(tiles), atol=1e-4, rtol=0)
    assert len(recorded.options) == 3  # 4 (failed), 2, 1; batches of 4 (and 3, padded to 4) never retried
    warnings = [record.getMessage() for record in caplog.records if record.name == "service.engine"]
    assert len(warnings) == 1 and "capturing a CUDA graph for batches of 4 tiles" in warnings[0]


def _record_batch_sizes(engine: Engine) -> list[int]:
    """The batch sizes the engine's network is run on from now on, in order."""
    sizes = []

    def recording(network, batch):
        sizes.append(len(batch))
        return Engine._run(engine, network, batch)

    engine._run = recording
    return sizes


@pytest.mark.skipif(not ON_CUDA, reason="cuDNN's autotuning per batch shape is CUDA's")
def test_cuda_warmup_runs_every_batch_shape_and_pads_partial_batches_to_them(tiny_model):
    engine = Engine(tiny_model, device="cuda", tile_size=64, max_batch_size=6, cuda_graphs=False)
    sizes = _record_batch_sizes(engine)
    engine.warmup(1)
    assert sizes == [6, 4, 2, 1]
    sizes.clear()
    tiles = _tiles(5, side=64, seed=2)
    assert engine.forward(tiles).shape == tiles.shape and engine.forward(tiles[:3]).shape == (3, 3, 64, 64)
    engine.forward(_tiles(2, side=40))
    assert sizes == [6, 4, 2]  # 5 -> 6, 3 -> 4; another tile shape is not padded


def test_cpu_eager_batches_run_as_they_come(tiny_model):
    engine = Engine(tiny_model, device="cpu", tile_size=32, max_batch_size=4)
    sizes = _record_batch_sizes(engine)
    engine.warmup(2)
    engine.forward(_tiles(3))
    engine.forward(_tiles(6))
    assert sizes == [2, 3, 6]  # no batch shapes prepared, nothing padded


def test_fast_path_batch_shapes_are_powers_of_two_and_the_largest(tiny_model):
    assert Engine(tiny_model, device="cpu", max_batch_size=6).batch_shapes() == [1, 2, 4, 6]
    assert Engine(tiny_model, device="cpu", max_batch_size=1).batch_shapes() == [1]


@pytest.mark.skipif(not ON_CUDA and os.environ.get("MPRNET_TEST_CPU_COMPILE") != "1",
                    reason="torch.compile on the CPU builds C++ kernels: a tiny model did not finish in 240 s on "
                           "this 2-core machine; on CUDA, "
                           "or with MPRNET_TEST_CPU_COMPILE=1, it runs")
def test_compiled_engine_matches_eager_and_compiles_only_at_warmup(tiny_model):
    device = "cuda" if ON_CUDA else "cpu"
    eager = Engine(tiny_model, device=device, tile_size=32, max_batch_size=2, cuda_graphs=False)
    compiled = Engine(tiny_model, device=device, tile_size=32, max_batch_size=2, compile=True)
    compiled.warmup()
    tiles = _tiles(1, seed=4)
    from torch._dynamo.utils import counters
    frames = counters["stats"]["unique_graphs"]
    np.testing.assert_allclose(compiled.forward(tiles), eager.forward(tiles), atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == frames  # the request paid for no compilation
    assert compiled.compiled_graphs >= len(compiled.batch_shapes())  # none fell back to eager at the limit


def test_compiled_engines_raise_dynamos_recompile_limit_to_their_batch_shapes(tiny_model, monkeypatch):
    import torch._dynamo

    config = torch._dynamo.config
    monkeypatch.setattr(engine_module, "_compiled_batch_shapes", 0)
    monkeypatch.setattr(config, "recompile_limit", 8)  # torch's default, restored afterwards
    # Building a compiled engine compiles nothing yet (that is warm-up's job), so this is quick.
    first = Engine(tiny_model, device="cpu", tile_size=32, max_batch_size=16, compile=True)
    second = Engine(tiny_model, device="cpu", tile_size=32, max_batch_size=16, compile=True)
    needed = len(first.batch_shapes()) + len(second.batch_shapes())
    assert needed == 10 and config.recompile_limit == needed
    Engine(tiny_model, device="cpu", tile_size=32, max_batch_size=16)  # not compiled: needs nothing
    assert config.recompile_limit == needed


def test_a_compilation_after_warmup_is_logged(tiny_model, monkeypatch, caplog):
    engine = Engine(tiny_model, device="cpu", tile_size=32, max_batch_size=4, compile=True)
    # Compiling is out of reach on this CPU (see the compile test), so the fast path runs a
    # stand-in that counts a compiled graph for each input shape it has not seen, as Dynamo does.
    seen, compiled = set(), []

    def compiling(batch):
        if batch.shape not in seen:
            seen.add(batch.shape)
            compiled.append(batch.shape)
        return engine.model(batch)

    engine._fast_model = compiling
    monkeypatch.setattr(engine_module, "_dynamo_graphs_compiled", lambda: len(compiled))
    def warnings() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.name == "service.engine"]

    with caplog.at_level(logging.WARNING, logger="service.engine"):
        engine.warmup()
        engine.forward(_tiles(3))
        assert engine.compiled_graphs == 3 and not warnings()  # 4, 2 and 1 at warm-up; 3 is padded to 4
        seen.clear()  # as if a guard failed
        engine.forward(_tiles(1))
    assert engine.compiled_graphs == 4
    assert len(warnings()) == 1 and "after warm-up" in warnings()[0]


def test_fast_path_settings_parse_from_flags_and_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--channels-last", "true", "--compile", "1",
                                                     "--auto-size", "yes"]))
    assert (settings.channels_last, settings.compile, settings.cuda_graphs, settings.auto_size) == (
        True, True, None, True)
    monkeypatch.setenv("MPRNET_CUDA_GRAPHS", "false")
    assert Settings().cuda_graphs is False
    monkeypatch.delenv("MPRNET_CUDA_GRAPHS")
    defaults = Settings(_env_file=None)
    # Graphs are left to the device (on for CUDA); channels-last is on everywhere (both measured).
    assert (defaults.channels_last, defaults.compile, defaults.cuda_graphs, defaults.auto_size) == (
        True, False, None, False)


def test_cuda_graphs_default_to_off_on_the_cpu(tiny_model):
    engine = Engine(tiny_model, device="cpu", tile_size=32)
    assert engine.describe()["cuda_graphs"] is False and engine.describe()["channels_last"] is True


@pytest.mark.skipif(not ON_CUDA, reason="the default is decided for a CUDA device")
def test_cuda_graphs_default_to_on_for_cuda_unless_compiling(tiny_model):
    assert Engine(tiny_model, device="cuda", tile_size=32).cuda_graphs is True
    assert Engine(tiny_model, device="cuda", tile_size=32, compile=True).cuda_graphs is False


def test_batch_size_defaults_to_one_on_the_cpu_and_sixteen_on_cuda(tiny_model):
    assert Settings(_env_file=None, device="cpu").max_batch_size == 1
    assert Settings(_env_file=None, device="cuda:1").max_batch_size == 16  # read from the name; not loaded
    assert Settings(_env_file=None, devices="cpu,cuda:0").max_batch_size == 1  # the first device's
    assert Settings(_env_file=None, device="auto").max_batch_size == (16 if torch.cuda.is_available() else 1)
    assert Settings(_env_file=None, device="cpu", max_batch_size=3).max_batch_size == 3
    engine = Engine(tiny_model, device="cpu", tile_size=32)
    assert engine.max_batch_size == default_batch_size("cpu") == 1 and default_batch_size("cuda") == 16


def test_the_queue_is_built_with_the_sizes_automatic_sizing_chose(tiny_weights, monkeypatch):
    # Automatic sizing runs on CUDA only; here the settings are replaced as it replaces them, once
    # the engines are loaded. The queue used to keep the bound and batch limit from before.
    from service.batching import TooManyTiles
    from service.state import ServiceState
    settings = Settings(tasks="denoising", weights_denoising=tiny_weights(7), device="cpu", tile_size=32,
                        tile_overlap=8, max_batch_size=4, max_queued_tiles=64, backend="torch", decode_workers=1)
    loading = ServiceState._load_engines

    async def load_and_size(self: ServiceState) -> None:
        await loading(self)
        self.settings = self.settings.model_copy(update={"max_queued_tiles": 200, "max_batch_size": 2})

    monkeypatch.setattr(ServiceState, "_load_engines", load_and_size)

    async def scenario() -> str:
        state = ServiceState(settings)
        await state.load()
        try:
            assert state.batcher is not None, state.load_error
            with pytest.raises(TooManyTiles) as refused:
                await state.batcher.submit("denoising", np.zeros((201, 3, 32, 32), np.float32))
            return str(refused.value)
        finally:
            await state.close()

    assert "more than the queue holds (200)" in asyncio.run(scenario())


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
    engine.forward(_tiles(5, seed=9))  # over max_batch_size: eager, not one more compiled shape
    assert seen == [(True, 4, (32, 32)), (False, 2, (40, 40)), (False, 5, (32, 32))]


def test_fastpath_check_reports_every_part_on_the_cpu(tmp_path):
    # The device run's script, as its CPU run: what needs CUDA, or more time than the budget, says so.
    report_path = tmp_path / "fastpath.json"
    assert fastpath_check.main(["--device", "cpu", "--json", str(report_path), "--time-budget", "60"]) == 0
    report = json.loads(report_path.read_text())
    parts = report["parts"]
    assert list(parts) == ["auto_sizing", "graphs_vs_eager", "graph_batches", "compiled_shape"]
    assert parts["auto_sizing"]["status"] == "ok" and parts["auto_sizing"]["tile_size"] == DEFAULT_TILE_SIZE
    assert parts["graphs_vs_eager"] == parts["graph_batches"] == {"status": "skipped",
                                                                  "reason": "CUDA graphs need a CUDA device"}
    assert parts["compiled_shape"]["status"] == "skipped" and "of the budget left" in parts["compiled_shape"]["reason"]
    assert report["device"] == "cpu" and report["total_s"] < 60


def test_fastpath_check_keeps_its_report_when_a_part_overruns_the_budget(tmp_path):
    # A part that cannot be interrupted (torch.compile) is stood in for by a sleep; the watchdog
    # writes the report, with the part marked, and ends the process before a caller's limit would.
    report_path = tmp_path / "fastpath.json"
    script = (f"import time; from bench import fastpath_check as check\n"
              f"check.PARTS['auto_sizing'] = lambda setup: time.sleep(60)\n"
              f"check.main(['--device', 'cpu', '--time-budget', '3', '--json', {str(report_path)!r}])\n")
    started = time.monotonic()
    finished = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 3, finished.stderr
    assert time.monotonic() - started < 3 + fastpath_check._GRACE_S + 20
    report = json.loads(report_path.read_text())
    assert report["parts"]["auto_sizing"]["status"] == "error" and report["stopped"] is True
    assert "past the time budget" in report["parts"]["auto_sizing"]["error"]
