"""Hostile and heavy uploads against the real server: decode bombs, a slow decode, memory that
must be given back on every path, and a small request beside a large one."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref

import httpx
import pytest

from service.config import Settings
from service.decoding import DecoderPool
from service.pipeline import RestorePipeline

from attacks import chunk_bomb, ifd_bomb, scan_bomb, smooth_image
from service_helpers import encode, running_server, tiny_checkpoint


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "denoising.safetensors", seed=3)


def _settings(weights, **overrides) -> Settings:
    values = dict(tasks="denoising", weights_denoising=weights, device="cpu", tile_size=64, tile_overlap=8)
    values.update(overrides)
    return Settings(**values)


def test_decode_bombs_are_refused_quickly_and_a_small_request_beside_them_is_served(weights):
    jpeg, tiff = scan_bomb(), ifd_bomb()
    assert len(jpeg) < 300_000 and len(tiff) < 5_000_000
    small = encode(smooth_image(64, 64))
    with running_server(_settings(weights)) as server:
        url = f"{server.url}/v1/restore/denoising"

        async def post(name: str, data: bytes, delay: float = 0.0):
            await asyncio.sleep(delay)
            async with httpx.AsyncClient(timeout=60) as client:
                started = time.monotonic()
                response = await client.post(url, files={"image": (name, data)})
                return name, response.status_code, response.json() if response.status_code != 200 else None, \
                    time.monotonic() - started

        async def attack():
            return await asyncio.gather(post("a.jpg", jpeg), post("b.jpg", jpeg), post("c.tif", tiff),
                                        post("small.png", small, delay=0.2))

        results = {name: rest for name, *rest in asyncio.run(attack())}
    for name in ("a.jpg", "b.jpg"):
        status, body, seconds = results[name]
        assert status == 400 and "scans" in body["error"]["message"] and seconds < 3, results[name]
    status, body, seconds = results["c.tif"]
    assert status == 415 and "more than one frame" in body["error"]["message"] and seconds < 3, results["c.tif"]
    status, _, seconds = results["small.png"]
    assert status == 200 and seconds < 3, results["small.png"]


def test_a_png_split_into_more_chunks_than_any_encoder_writes_is_refused_before_decoding(weights):
    bomb = chunk_bomb()
    with running_server(_settings(weights)) as server:
        response = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("c.png", bomb)}, timeout=60)
        assert response.status_code == 400 and "chunks" in response.json()["error"]["message"]
        ok = httpx.post(f"{server.url}/v1/restore/denoising",
                        files={"image": ("small.png", encode(smooth_image(32, 32)))}, timeout=60)
        assert ok.status_code == 200


def test_a_decode_past_the_time_limit_is_stopped_and_the_service_goes_on(weights):
    slow = encode(smooth_image(1500, 1500))
    with running_server(_settings(weights, decode_timeout_s=0.01, max_pixels=2000 * 2000)) as server:
        url = f"{server.url}/v1/restore/denoising"
        pids = {decoder.process.pid for decoder in server.service.decoders._decoders}
        response = httpx.post(url, files={"image": ("slow.png", slow)}, timeout=60)
        assert response.status_code == 422 and response.json()["error"]["code"] == "image_too_complex"
        assert "0.01 s" in response.json()["error"]["message"]
        # The stopped decoder was replaced by a fresh process, which serves the next upload (given
        # the time a small image needs on a loaded machine).
        server.service.decoders.timeout_s = 30
        ok = httpx.post(url, files={"image": ("small.png", encode(smooth_image(32, 32)))}, timeout=60)
        assert ok.status_code == 200
        assert {decoder.process.pid for decoder in server.service.decoders._decoders} != pids


def test_a_decode_cancelled_twice_still_gives_its_decoder_back():
    # Over HTTP: a progress stream's deadline cancels a decode, and its client hangs up a few
    # milliseconds later, cancelling it again while the killed decoder is being replaced. Each
    # time the pool lost a process, until uploads waited forever while /readyz said ready.
    slow = encode(smooth_image(2500, 2500))

    async def scenario():
        pool = DecoderPool(workers=2, max_pixels=None, timeout_s=30)
        first_pids = {decoder.process.pid for decoder in pool._decoders}
        try:
            for _ in range(3):
                decode = asyncio.ensure_future(pool.decode(slow))
                await asyncio.sleep(0.05)
                decode.cancel()
                await asyncio.sleep(0)  # into the cleanup, where the second cancel lands
                decode.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await decode
            small = await asyncio.wait_for(asyncio.gather(*(pool.decode(encode(smooth_image(32, 32)))
                                                            for _ in range(2))), 30)
            assert [image.width for image in small] == [32, 32]
            assert pool._idle.qsize() == 2 and all(decoder.alive for decoder in pool._decoders)
            # The cancels did stop decodes in flight (not ones already finished), and were replaced.
            assert not first_pids & {decoder.process.pid for decoder in pool._decoders}
        finally:
            pool.close()

    asyncio.run(scenario())


class _Gate:
    """Wraps a real network's forward pass so the test decides when it runs, or makes it fail."""

    def __init__(self, forward):
        self.forward = forward
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = False

    def __call__(self, tiles):
        self.entered.set()
        assert self.release.wait(60), "the test never released the forward pass"
        if self.fail:
            raise RuntimeError("the network failed on this batch")
        return self.forward(tiles)


def test_every_way_a_request_ends_releases_its_arrays_without_the_garbage_collector(weights, monkeypatch):
    held: list[weakref.ref] = []
    real_cut = RestorePipeline.cut

    def recording_cut(self, decoded):
        held.append(weakref.ref(decoded.rgb))
        prepared = real_cut(self, decoded)
        held.append(weakref.ref(prepared.tiles))
        return prepared

    monkeypatch.setattr(RestorePipeline, "cut", recording_cut)
    # pytest keeps every log record, tracebacks and their frames included, for its report; a
    # logging handler in a deployment formats a record and lets it go.
    monkeypatch.setattr(logging.getLogger("service"), "propagate", False)
    image = encode(smooth_image(150, 150))
    settings = _settings(weights, request_timeout_s=30, max_queued_tiles=20)
    gc.collect()
    gc.disable()
    try:
        with running_server(settings) as server:
            url = f"{server.url}/v1/restore/denoising"
            worker = server.service.batcher._workers[0]
            gate = _Gate(worker.forward_by_task["denoising"])
            worker.forward_by_task["denoising"] = gate

            def all_released() -> bool:
                return all(ref() is None for ref in held)

            def expect_released(what: str) -> None:
                deadline = time.monotonic() + 10
                while not all_released():
                    assert time.monotonic() < deadline, f"{what}: arrays still alive with the collector off"
                    time.sleep(0.02)
                held.clear()

            # Success.
            gate.release.set()
            assert httpx.post(url, files={"image": ("ok.png", image)}, timeout=30).status_code == 200
            expect_released("success")
            # Too many tiles for the queue: refused after decoding, before cutting.
            big = encode(smooth_image(64 * 6, 64 * 6))
            assert httpx.post(url, files={"image": ("big.png", big)}, timeout=30).status_code == 413
            expect_released("413")
            # The batch fails.
            gate.fail = True
            assert httpx.post(url, files={"image": ("fail.png", image)}, timeout=30).status_code == 500
            gate.fail = False
            expect_released("batch failure")
            # The client leaves while its tiles are in a forward pass.
            gate.release.clear()
            gate.entered.clear()
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, files={"image": ("gone.png", image)}, timeout=httpx.Timeout(30, read=1.0))
            assert gate.entered.wait(10)
            gate.release.set()
            expect_released("client gone")
            # No room in the memory budget for a second image while the first is held.
            gate.release.clear()
            gate.entered.clear()
            server.service.budget.max_pixels = 150 * 150
            first = threading.Thread(target=lambda: httpx.post(url, files={"image": ("1.png", image)}, timeout=30))
            first.start()
            assert gate.entered.wait(10)
            refused = httpx.post(url, files={"image": ("2.png", image)}, timeout=30)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "over_capacity"
            assert refused.headers["Retry-After"]
            gate.release.set()
            first.join(30)
            expect_released("503 over capacity")
            # An event stream: finished, and closed by its client while its tiles are in a pass.
            stream = {"Accept": "text/event-stream"}
            finished = httpx.post(url, files={"image": ("s.png", image)}, headers=stream, timeout=30)
            assert "event: result" in finished.text
            expect_released("stream finished")
            gate.release.clear()
            gate.entered.clear()
            with httpx.stream("POST", url, files={"image": ("s.png", image)}, headers=stream, timeout=30) as opened:
                assert opened.status_code == 200
                assert gate.entered.wait(10)
            gate.release.set()
            expect_released("stream closed by its client")
            # Past the deadline while queued behind a held pass.
            gate.release.clear()
            gate.entered.clear()
            server.service.settings = server.service.settings.model_copy(update={"request_timeout_s": 1.0})
            response = httpx.post(url, files={"image": ("late.png", image)}, timeout=30)
            assert response.status_code == 504
            gate.release.set()
            expect_released("504")
    finally:
        gc.enable()


def test_a_small_request_is_served_while_a_large_one_is_still_being_restored(weights):
    large = encode(smooth_image(1200, 1200))  # 484 tiles of 64 px
    small = encode(smooth_image(64, 64))
    with running_server(_settings(weights)) as server:
        url = f"{server.url}/v1/restore/denoising"
        finished: list[str] = []

        def post(name: str, data: bytes) -> None:
            response = httpx.post(url, files={"image": (name, data)}, timeout=300)
            assert response.status_code == 200, response.text
            finished.append(name)

        large_client = threading.Thread(target=post, args=("large", large))
        large_client.start()
        deadline = time.monotonic() + 120
        while server.service.metrics.request_tiles.labels("denoising")._sum.get() == 0:
            assert time.monotonic() < deadline, "the large image never reached the queue"
            time.sleep(0.02)
        post("small", small)
        large_client.join(300)
    # Served oldest-first, the small one would wait for all 484 tiles of the large one.
    assert finished == ["small", "large"]
