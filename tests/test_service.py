"""The HTTP service end to end: a real uvicorn server on loopback with tiny real MPRNet checkpoints."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from models import MPRNet, sha256_file
from service.config import Settings, add_serve_arguments, settings_from_args
from service.engine import Engine
from service.tiling import Tiling

from service_helpers import (
    TINY_ARCHITECTURE,
    decode_png,
    encode,
    eventually,
    metric_samples,
    metric_value,
    multipart_body,
    random_image,
    running_server,
    serving_process,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)  # hangs fail; a slow shared CI machine does not

TILE, OVERLAP = 32, 8
MAX_UPLOAD_BYTES = 100_000
MAX_PIXELS = 96 * 96


@pytest.fixture(scope="module")
def checkpoints(tiny_weights) -> dict[str, Path]:
    return {"denoising": tiny_weights(1), "deraining": tiny_weights(2)}


def service_settings(checkpoints: dict[str, Path], **overrides) -> Settings:
    values = dict(tasks="denoising,deraining", weights_denoising=checkpoints["denoising"],
                  weights_deraining=checkpoints["deraining"], device="cpu", precision="fp32",
                  tile_size=TILE, tile_overlap=OVERLAP, max_batch_size=8, max_batch_wait_ms=300,
                  max_queued_tiles=64, max_upload_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS,
                  request_timeout_s=60, graceful_shutdown_s=10, log_level="info")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def server(checkpoints):
    with running_server(service_settings(checkpoints)) as running:
        yield running


@pytest.fixture(scope="module")
def offline_engines(checkpoints) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Per task, the same network restoring an image in this process, tiled as the service tiles."""
    tiles = Tiling(TILE, overlap=OVERLAP)
    return {task: functools.partial(tiles.restore,
                                    forward=Engine.from_checkpoint(path, device="cpu", tile_size=TILE).forward)
            for task, path in checkpoints.items()}


@pytest.fixture(scope="module")
def slow_server(checkpoints):
    """Batches that never fill (64 > the 16-tile queue) and wait 10 s: tiles sit in the queue, and
    requests time out after 8 s, before any batch would run (the wait starts after the request)."""
    settings = service_settings(checkpoints, tasks="denoising", max_batch_size=64, max_batch_wait_ms=10_000,
                                max_queued_tiles=16, request_timeout_s=8)
    with running_server(settings) as running:
        yield running


def restore(url: str, task: str, data: bytes, filename: str = "upload.png", **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/restore/{task}", files={"image": (filename, data, "application/octet-stream")},
                      timeout=60, **kwargs)


def as_array(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(decode_png(response.content))


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"] and "Traceback" not in response.text
    return body


def close_to(restored: np.ndarray, expected: np.ndarray) -> bool:
    # A forward pass over a batch of 8 and one over a batch of 1 may round differently in the
    # last float bit, which can move a pixel by one level after quantisation.
    return restored.shape == expected.shape and int(np.abs(restored.astype(int) - expected).max()) <= 1


# -- settings -----------------------------------------------------------------------------------

def test_settings_come_from_the_environment_and_flags_override_them(monkeypatch, tmp_path):
    import argparse
    monkeypatch.setenv("MPRNET_TASKS", "denoising, deraining")
    monkeypatch.setenv("MPRNET_WEIGHTS_DENOISING", str(tmp_path / "dn.pth"))
    monkeypatch.setenv("MPRNET_DEVICE", "cpu")
    monkeypatch.setenv("MPRNET_TILE_SIZE", "128")
    monkeypatch.setenv("MPRNET_MAX_BATCH_SIZE", "6")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--max-batch-size", "3", "--port", "9001", "--protect-metrics",
                                                     "--api-key-hashes", "0" * 64, "--compile", "false"]))
    assert settings.protect_metrics is True and settings.compile is False  # a switch alone turns it on
    assert settings.tasks == ("denoising", "deraining")
    assert settings.weights_path("denoising") == tmp_path / "dn.pth"
    assert (settings.device, settings.tile_size, settings.max_batch_size, settings.port) == ("cpu", 128, 3, 9001)
    assert re.search(r"^  max_batch_size +=  ?3$", settings.summary(), re.M)
    # Unset, the queue bound holds two images at the pixel limit: 43 x 43 tiles of 128 for 4096 x 4096.
    assert settings.max_pixels == 4096 * 4096 and settings.max_queued_tiles == 2 * 43 * 43


@pytest.mark.parametrize("flags, field, complaint", [
    (["--tasks", "sharpening"], "tasks", "unknown task(s) sharpening"),
    (["--device", "tpu"], "device", "auto, cpu, cuda or cuda:N"),
    (["--precision", "fp8"], "precision", "fp32"),
    (["--tile-size", "100"], None, "multiple of 8"),
    (["--tile-overlap", "16", "--tile-size", "32"], None, "under half"),
    (["--max-batch-size", "0"], "max_batch_size", "greater than or equal to 1"),
    (["--max-queued-tiles", "0"], "max_queued_tiles", "greater than or equal to 1"),
    # Past Pillow's ceiling no image opens, whatever the limit says; the tile bound built from a
    # limit of 10**14 listed 4e8 tiles and exhausted memory before the service could start.
    (["--max-pixels", str(10 ** 14)], "max_pixels", "less than or equal to 178956970"),
    (["--protect-metrics"], "protect_metrics", "no API key hashes are configured"),
    (["--protect-health", "true"], "protect_health", "no API key hashes are configured"),
    # uvicorn would listen on every interface.
    (["--host", ""], "host", "host is empty"),
])
def test_invalid_settings_are_refused_naming_the_setting(flags, field, complaint):
    import argparse
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(ValidationError) as refused:
        settings_from_args(parser.parse_args(flags))
    (error,) = refused.value.errors()
    assert error["loc"][:1] == ((field,) if field else ())
    assert complaint in error["msg"]


def test_empty_values_from_the_environment_mean_unset_and_switches_stand_alone(monkeypatch, tmp_path):
    import argparse

    from models.weights import resolve
    # What a template or an env file gives for a variable it leaves empty.
    for name in ("MPRNET_WEIGHTS_DENOISING", "MPRNET_MODEL_CACHE_DIR", "MPRNET_DEVICES"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert settings.weights_path("denoising") == resolve("denoising")  # not Path("."), the working folder
    assert settings.model_cache_dir is None  # "empty: nowhere", not the working folder
    monkeypatch.setenv("MPRNET_HOST", " ")
    with pytest.raises(ValidationError, match="host is empty"):
        Settings()
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert settings_from_args(parser.parse_args(["--host", "::1", "--cuda-graphs"])).cuda_graphs is True
    assert settings_from_args(parser.parse_args(["--host", "::1", "--cuda-graphs", "false"])).cuda_graphs is False


def test_the_largest_pixel_limit_builds_its_queue_bound_without_listing_tiles():
    import tracemalloc

    from service.imaging import LARGEST_DECODABLE_PIXELS
    tracemalloc.start()
    try:
        # 8 px tiles at Pillow's ceiling: 1,673 x 1,673 of them, 2.8 million tile origins if listed.
        settings = Settings(max_pixels=LARGEST_DECODABLE_PIXELS, tile_size=8, tile_overlap=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert settings.max_queued_tiles == 2 * 1673 * 1673
    assert peak < 16 * 2 ** 20


# -- results ------------------------------------------------------------------------------------

def test_each_task_returns_a_png_of_the_input_size_restored_by_its_own_model(server, offline_engines):
    image = random_image(40, 56, seed=10)
    results = {task: as_array(restore(server.url, task, encode(image))) for task in ("denoising", "deraining")}
    for task, restored in results.items():
        assert restored.shape == (40, 56, 3)
        assert close_to(restored, offline_engines[task](image))
    assert not close_to(results["denoising"], results["deraining"])


def test_grayscale_stays_grayscale_and_alpha_is_kept(server):
    grey = random_image(24, 40, seed=11, channels=1)
    grey_result = decode_png(restore(server.url, "denoising", encode(grey, mode="L")).content)
    assert grey_result.mode == "L" and grey_result.size == (40, 24)

    rgba = random_image(24, 16, seed=12, channels=4)
    rgba_result = decode_png(restore(server.url, "denoising", encode(rgba, mode="RGBA")).content)
    assert rgba_result.mode == "RGBA" and rgba_result.size == (16, 24)
    np.testing.assert_array_equal(np.asarray(rgba_result)[:, :, 3], rgba[:, :, 3])


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_result(checkpoints, offline_engines,
                                                                               start_server):
    # One-tile images, so that any forward pass over more than one tile mixes requests. A batch
    # waits (far longer than the requests take to arrive) until all eight are in it.
    server = start_server(service_settings(checkpoints, max_batch_wait_ms=10_000))
    images = [random_image(24, 24, seed=100 + i) for i in range(8)]
    before = server.metrics()

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/restore/denoising", files={"image": ("i.png", encode(image), "image/png")})
                for image in images))

    responses = asyncio.run(send_all())
    after = server.metrics()
    results = [as_array(response) for response in responses]
    for image, restored in zip(images, results):
        assert close_to(restored, offline_engines["denoising"](image))
    assert len({restored.tobytes() for restored in results}) == len(images)

    def growth(name: str) -> float:
        return metric_value(after, name, task="denoising") - metric_value(before, name, task="denoising")

    assert growth("mprnet_batch_size_sum") == len(images)
    assert growth("mprnet_batch_size_count") == 1, "the requests did not share one forward pass"


def test_request_id_is_echoed_or_created_and_server_timing_is_reported(server):
    image = encode(random_image(16, 16, seed=13))
    echoed = restore(server.url, "denoising", image, headers={"X-Request-ID": "client-42.a"})
    assert echoed.headers["x-request-id"] == "client-42.a"
    timing = dict(re.findall(r"(\w+);dur=([\d.]+)", echoed.headers["server-timing"]))
    assert {"queue", "inference", "total"} <= set(timing)
    assert float(timing["total"]) >= float(timing["inference"]) > 0

    created = restore(server.url, "denoising", image, headers={"X-Request-ID": "spaces; and=signs"})
    assert re.fullmatch(r"[0-9a-f]{32}", created.headers["x-request-id"])
    assert restore(server.url, "nope", image).headers["x-request-id"]


# -- errors -------------------------------------------------------------------------------------

def _chunked_upload(url: str, size: int) -> httpx.Response:
    body, content_type = multipart_body("image", "big.png", os.urandom(size))
    chunks = (body[start:start + 8192] for start in range(0, len(body), 8192))
    return httpx.post(f"{url}/v1/restore/denoising", content=chunks, headers={"Content-Type": content_type},
                      timeout=60)


ERROR_CASES = {
    "unknown task": (lambda url: restore(url, "sharpening", encode(random_image(16, 16, 1))), 404, "unknown_task"),
    "task not loaded here": (lambda url: restore(url, "deblurring", encode(random_image(16, 16, 1))),
                             404, "unknown_task"),
    "missing image field": (lambda url: httpx.post(f"{url}/v1/restore/denoising",
                                                   files={"file": ("a.png", encode(random_image(16, 16, 1)))}),
                            422, "validation_error"),
    "image field sent twice": (lambda url: httpx.post(f"{url}/v1/restore/denoising", files=[
        ("image", ("a.png", encode(random_image(16, 16, 1)))), ("image", ("b.png", encode(random_image(16, 16, 2))))]),
                               422, "validation_error"),
    "image sent as text field": (lambda url: httpx.post(f"{url}/v1/restore/denoising", data={"image": "pixels"}),
                                 422, "validation_error"),
    "bytes that are no image": (lambda url: restore(url, "denoising", b"definitely not an image"),
                                400, "invalid_image"),
    "truncated png": (lambda url: restore(url, "denoising", encode(random_image(32, 32, 2))[:300]),
                      400, "invalid_image"),
    "gif": (lambda url: restore(url, "denoising", encode(random_image(16, 16, 3), "GIF"), "a.gif"),
            415, "unsupported_media_type"),
    "too many pixels": (lambda url: restore(url, "denoising", encode(np.zeros((100, 100, 3), np.uint8))),
                        413, "image_too_large"),
    "strip needing more tiles than the queue": (
        lambda url: restore(url, "denoising", encode(np.zeros((4, 2304, 3), np.uint8))), 413, "image_too_large"),
    "upload over the byte limit": (lambda url: restore(url, "denoising", os.urandom(MAX_UPLOAD_BYTES + 1)),
                                   413, "payload_too_large"),
    "chunked upload over the byte limit": (lambda url: _chunked_upload(url, MAX_UPLOAD_BYTES + 1),
                                           413, "payload_too_large"),
    "wrong method": (lambda url: httpx.get(f"{url}/v1/restore/denoising"), 405, "method_not_allowed"),
    "unknown path": (lambda url: httpx.get(f"{url}/v2/anything"), 404, "not_found"),
}


def test_an_image_sent_as_a_text_field_is_told_how_to_send_a_file(server):
    # curl -F image=<photo.png sends the file's bytes as a text field, without a filename.
    response = httpx.post(f"{server.url}/v1/restore/denoising",
                          files={"image": (None, encode(random_image(16, 16, 5)).decode("latin-1"))})
    assert_error(response, 422, "validation_error")
    assert "came as text, not as a file" in response.json()["error"]["message"]
    assert "-F image=@" in response.json()["error"]["message"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_every_error_has_its_status_and_the_one_json_shape(server, case):
    send, status, code = ERROR_CASES[case]
    assert_error(send(server.url), status, code)
    assert restore(server.url, "denoising", encode(random_image(16, 16, seed=4))).status_code == 200


def queue_depth(server) -> float:
    return metric_value(server.metrics(), "mprnet_queue_depth_tiles")


def test_a_full_queue_answers_503_with_retry_after_and_a_stuck_request_504(slow_server):
    async def scenario():
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as client:
            filling = asyncio.create_task(client.post(
                "/v1/restore/denoising", files={"image": ("full.png", encode(random_image(96, 96, 5)))}))

            async def queue_full() -> bool:
                assert not filling.done(), filling.result().text
                return metric_value((await client.get("/metrics")).text, "mprnet_queue_depth_tiles") == 16

            await eventually(queue_full, "the upload's 16 tiles to fill the queue")
            refused = await client.post("/v1/restore/denoising",
                                        files={"image": ("more.png", encode(random_image(16, 16, 6)))})
            return refused, await filling, (await client.get("/metrics")).text

    refused, stuck, metrics = asyncio.run(scenario())
    assert_error(refused, 503, "queue_full")
    assert int(refused.headers["retry-after"]) >= 1
    assert_error(stuck, 504, "timeout")
    assert metric_value(metrics, "mprnet_queue_depth_tiles") == 0
    assert metric_value(metrics, "mprnet_batch_size_count") == 0, "a timed-out request's tiles were computed"
    assert metric_value(metrics, "mprnet_requests_total", task="denoising", code="503") >= 1
    assert metric_value(metrics, "mprnet_requests_total", task="denoising", code="504") >= 1


def request_head(url: httpx.URL, content_type: str, content_length: int) -> bytes:
    return (f"POST /v1/restore/denoising HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before a whole response came: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = connection.recv(65536)
        assert chunk, "the connection closed in the middle of the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def test_a_full_queue_refuses_before_reading_the_body(slow_server):
    """The refusal costs the server no upload: it answers a request that has sent its headers and
    none of the body it declares. A server that read the body first would wait for it forever."""
    url = httpx.URL(slow_server.url)
    filling, content_type = multipart_body("image", "full.png", encode(random_image(96, 96, 8)))
    before = slow_server.metrics()
    with socket.create_connection((url.host, url.port), timeout=30) as filler:
        filler.sendall(request_head(url, content_type, len(filling)) + filling)
        wait_until(lambda: queue_depth(slow_server) == 16, "the upload's 16 tiles to fill the queue")
        with socket.create_connection((url.host, url.port), timeout=30) as waiting:
            waiting.sendall(request_head(url, content_type, 90_000))  # under the upload limit, so not a 413
            try:
                status, headers, body = read_response(waiting)
            except TimeoutError:
                pytest.fail("no answer while the declared body was unsent: the server waited to read it")
    # The filler has hung up, which drops its tiles (and answers it 499 in the metrics).
    wait_until(lambda: queue_depth(slow_server) == 0, "the abandoned upload's tiles to be dropped")
    assert status == 503, body
    assert json.loads(body)["error"]["code"] == "queue_full"
    assert int(headers["retry-after"]) >= 1
    after = slow_server.metrics()
    assert metric_value(after, "mprnet_batch_size_count") == metric_value(before, "mprnet_batch_size_count")


def test_a_client_that_disconnects_has_its_queued_tiles_dropped(slow_server):
    url = httpx.URL(slow_server.url)
    body, content_type = multipart_body("image", "gone.png", encode(random_image(40, 40, 7)))
    before = slow_server.metrics()

    def answered(text: str, code: str) -> float:
        return metric_value(text, "mprnet_requests_total", code=code) - metric_value(before, "mprnet_requests_total",
                                                                                    code=code)

    with socket.create_connection((url.host, url.port)) as connection:
        connection.sendall(request_head(url, content_type, len(body)) + body)
        wait_until(lambda: queue_depth(slow_server) == 4, "the upload's 4 tiles to be queued")
    # The request's own deadline would drop the tiles too, but answer 504: a 499 and no 504 says
    # that the hang-up itself dropped them.
    def dropped() -> str | None:
        text = slow_server.metrics()
        return text if answered(text, "499") == 1 and metric_value(text, "mprnet_queue_depth_tiles") == 0 else None

    metrics = wait_until(dropped, "the hang-up to be noticed and its tiles dropped")
    assert answered(metrics, "504") == 0
    assert metric_value(metrics, "mprnet_batch_size_count") == 0


# -- operations ---------------------------------------------------------------------------------

def test_metrics_parse_and_carry_the_documented_names(server):
    restore(server.url, "denoising", encode(random_image(16, 16, seed=20)))
    restore(server.url, "no-such-task", encode(random_image(16, 16, seed=20)))
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    for name in ("mprnet_requests_total", "mprnet_request_duration_seconds_bucket", "mprnet_queue_wait_seconds_count",
                 "mprnet_batch_size_bucket", "mprnet_batch_inference_seconds_count", "mprnet_request_tiles_count",
                 "mprnet_image_megapixels_count", "mprnet_queue_depth_tiles", "mprnet_requests_in_flight",
                 "mprnet_model_info"):
        assert name in samples, name
    assert metric_value(response.text, "mprnet_requests_total", task="denoising", code="200") >= 1
    assert metric_value(response.text, "mprnet_requests_total", task="unknown", code="404") >= 1
    assert metric_value(response.text, "mprnet_queue_capacity_tiles") == 64
    tasks_with_info = {s.labels["task"] for s in samples["mprnet_model_info"]}
    assert tasks_with_info == {"denoising", "deraining"}
    assert all(s.labels["device"] == "cpu" and s.labels["n_feat"] == "8" for s in samples["mprnet_model_info"])
    bucket_bounds = {s.labels["le"] for s in samples["mprnet_request_duration_seconds_bucket"]}
    assert {"0.005", "60.0", "300.0"} <= bucket_bounds


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v1/models", "/", "/docs", "/openapi.json",
                                  "/static/app.js"])
def test_head_is_answered_wherever_get_is_with_the_same_headers_and_no_body(server, path):
    got, headed = httpx.get(server.url + path), httpx.head(server.url + path)
    assert (got.status_code, headed.status_code) == (200, 200)
    assert headed.content == b"" and headed.headers["content-type"] == got.headers["content-type"]
    if path != "/metrics":  # its counters move between the two requests
        assert headed.headers["content-length"] == got.headers["content-length"]
    assert headed.headers["x-request-id"]


def test_a_method_not_allowed_names_head_beside_get(server):
    for path in ("/healthz", "/metrics", "/v1/models", "/static/app.js"):  # the last lists HEAD itself
        refused = httpx.post(server.url + path)
        assert_error(refused, 405, "method_not_allowed")
        assert refused.headers["allow"] == "GET, HEAD"
    refused = httpx.head(f"{server.url}/v1/restore/denoising")
    assert (refused.status_code, refused.headers["allow"], refused.content) == (405, "POST", b"")
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_models_endpoint_describes_each_task(server, checkpoints):
    body = httpx.get(f"{server.url}/v1/models").json()
    assert body["ready"] is True and set(body["models"]) == {"denoising", "deraining"}
    expected_parameters = sum(p.numel() for p in MPRNet(**TINY_ARCHITECTURE).parameters())
    for task, card in body["models"].items():
        assert card["weights_sha256"] == sha256_file(checkpoints[task])
        assert card["weights_file"] == checkpoints[task].name
        assert {key: card["architecture"][key] for key in TINY_ARCHITECTURE} == TINY_ARCHITECTURE
        assert card["parameters"] == expected_parameters
        assert (card["device"], card["precision"], card["tile_size"], card["tile_overlap"]) == ("cpu", "fp32", 32, 8)


def test_openapi_describes_the_upload(server):
    document = httpx.get(f"{server.url}/openapi.json").json()
    operation = document["paths"]["/v1/restore/{task}"]["post"]
    schema_ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = document["components"]["schemas"][schema_ref.rsplit("/", 1)[-1]]
    assert form["required"] == ["image"]
    assert form["properties"]["image"].get("format") == "binary" or \
        form["properties"]["image"].get("contentMediaType") == "application/octet-stream"
    assert "image/png" in operation["responses"]["200"]["content"]
    assert {"400", "404", "413", "415", "422", "503", "504"} <= set(operation["responses"])
    task_parameter = next(p for p in operation["parameters"] if p["name"] == "task")
    assert task_parameter["schema"]["enum"] == ["denoising", "deraining"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_each_request_logs_one_structured_line(server, caplog):
    caplog.set_level(logging.INFO, logger="service.requests")
    restore(server.url, "denoising", encode(random_image(40, 56, seed=21)), headers={"X-Request-ID": "log-line-1"})
    restore(server.url, "denoising", b"not an image", headers={"X-Request-ID": "log-line-2"})

    def lines_of(request_id: str) -> list[dict]:
        return [json.loads(record.getMessage()) for record in caplog.records
                if record.name == "service.requests" and request_id in record.getMessage()]

    # The line is written after the response has gone out, so on a busy machine it can trail it.
    wait_until(lambda: lines_of("log-line-1") and lines_of("log-line-2"), "both request log lines")
    (restored,), (refused,) = lines_of("log-line-1"), lines_of("log-line-2")
    assert restored["status"] == 200 and restored["task"] == "denoising" and "error" not in restored
    assert (restored["width"], restored["height"], restored["tiles"]) == (56, 40, 4)
    assert restored["queue_ms"] >= 0 and restored["inference_ms"] > 0 and restored["duration_ms"] > 0
    assert (refused["status"], refused["error"]) == (400, "invalid_image")


def test_readiness_turns_true_only_after_the_models_are_warm(checkpoints):
    # Tiles of 128 make the warm-up pass long enough to be seen from outside.
    settings = service_settings(checkpoints, tile_size=128, tile_overlap=16, max_pixels=256 * 256)
    with running_server(settings, wait_ready=False) as running:
        early_restore = restore(running.url, "denoising", encode(random_image(16, 16, seed=30)))
        early_ready = httpx.get(f"{running.url}/readyz")
        early_head = httpx.head(f"{running.url}/readyz")
        early_gauge = metric_value(running.metrics(), "mprnet_ready")
        assert httpx.get(f"{running.url}/healthz").status_code == 200
        assert httpx.head(f"{running.url}/healthz").status_code == 200
        assert early_head.status_code == 503 and early_head.content == b""
        assert_error(early_restore, 503, "not_ready")
        assert early_restore.headers["retry-after"]
        assert_error(early_ready, 503, "not_ready")
        assert early_gauge == 0
        running.wait_ready()
        assert httpx.get(f"{running.url}/readyz").json() == {"status": "ready"}
        assert httpx.head(f"{running.url}/readyz").status_code == 200
        assert metric_value(running.metrics(), "mprnet_ready") == 1
        assert restore(running.url, "denoising", encode(random_image(16, 16, seed=30))).status_code == 200


def test_models_that_fail_to_load_leave_the_service_alive_but_unready(checkpoints, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a checkpoint")
    settings = service_settings(checkpoints, tasks="denoising", weights_denoising=broken)
    with running_server(settings, wait_ready=False) as running:
        failed = wait_until(lambda: (response := httpx.get(f"{running.url}/readyz")).status_code == 503 and
                            "failed to load" in response.text and response, "the load to fail")
        body = assert_error(failed, 503, "not_ready")
        assert "broken.safetensors" in body["error"]["message"]
        assert metric_value(running.metrics(), "mprnet_ready") == 0
        assert_error(restore(running.url, "denoising", encode(random_image(16, 16, 1))), 503, "not_ready")
        assert httpx.get(f"{running.url}/healthz").status_code == 200



def test_a_model_that_fails_past_its_checkpoint_checks_is_named_with_its_file(checkpoints, monkeypatch):
    # A warm-up forward pass or a backend's conversion fails with PyTorch's own words, which name
    # neither the task nor the file ("cannot serve: The size of tensor a (19) must match ...").
    import service.state as state_module

    def failing_build(*args, **kwargs):
        raise RuntimeError("The size of tensor a (19) must match the size of tensor b (17)")

    monkeypatch.setattr(state_module, "build_engine", failing_build)
    state = state_module.ServiceState(service_settings(checkpoints, tasks="denoising", decode_workers=1))
    asyncio.run(state.load())
    asyncio.run(state.close())
    assert state.load_error == f"denoising from {checkpoints['denoising']}: The size of tensor a (19) must match " \
                               "the size of tensor b (17)"


def test_weights_that_are_no_regular_file_are_named_as_what_they_are(checkpoints, tmp_path, caplog):
    from service.server import _check_weights
    folder, fifo, loop = tmp_path / "folder", tmp_path / "fifo", tmp_path / "loop"
    folder.mkdir()
    os.mkfifo(fifo)  # opening it would block the start until a writer came
    loop.symlink_to(loop)
    for path, said in ((folder, "is a folder"), (fifo, "is not a regular file"),
                       (loop, "cannot be read (Too many levels of symbolic links)"),
                       (tmp_path / "missing", "does not exist")):
        caplog.clear()
        with pytest.raises(SystemExit) as refused:
            _check_weights(service_settings(checkpoints, tasks="denoising", weights_denoising=path))
        assert refused.value.code == 2
        assert f"cannot serve denoising: weights file {path} {said}" in caplog.text


# -- shutting down -------------------------------------------------------------------------------

def test_while_draining_readiness_is_off_and_new_requests_are_refused_but_queued_work_is_finished(checkpoints):
    """The app's lifespan drain, which SIGTERM leads to. uvicorn has closed its own listener by
    then, so the app is asked through a second listener on it that stays open (the side door)."""
    # A one-tile request waits up to 8 s for company that never comes, so it is still queued
    # while the drain runs, and the drain (graceful_shutdown_s) waits for it.
    settings = service_settings(checkpoints, tasks="denoising", max_batch_wait_ms=8000, graceful_shutdown_s=30)

    async def scenario(running):
        async with httpx.AsyncClient(base_url=running.side_url, timeout=60) as client:
            in_flight = asyncio.create_task(client.post(
                "/v1/restore/denoising", files={"image": ("a.png", encode(random_image(16, 16, seed=41)))}))

            async def metric(name: str) -> float:
                return metric_value((await client.get("/metrics")).text, name)

            async def queued() -> bool:
                assert not in_flight.done(), in_flight.result().text
                return await metric("mprnet_queue_depth_tiles") == 1

            await eventually(queued, "the request to be queued")
            assert (await client.get("/readyz")).status_code == 200
            running.begin_shutdown()

            async def unready_or_finished() -> httpx.Response | None:
                response = await client.get("/readyz")
                return response if response.status_code != 200 or in_flight.done() else None

            readiness = await eventually(unready_or_finished, "readiness to turn off or the request to finish")
            new_request = await client.post("/v1/restore/denoising",
                                            files={"image": ("b.png", encode(random_image(16, 16, seed=42)))})
            drain_was_waiting = not in_flight.done()  # so both answers above came during the drain
            # The drain lets the queued tiles be computed. The request's own answer is not checked
            # here: once its tiles are done the drain ends, and ServiceState.close shuts the
            # imaging pool, which can cancel the encoding still to come. Under `serve` uvicorn
            # answers every connection before the lifespan drain starts, and the SIGTERM test
            # below checks that answer.
            await in_flight
            computed = await metric("mprnet_batch_size_sum")
            return readiness, new_request, drain_was_waiting, computed

    with running_server(settings, side_door=True) as running:
        readiness, new_request, drain_was_waiting, computed = asyncio.run(scenario(running))
    assert drain_was_waiting, "the request in flight was finished before the drain was seen"
    body = assert_error(readiness, 503, "not_ready")
    assert "shutting down" in body["error"]["message"] and readiness.headers["retry-after"]
    assert_error(new_request, 503, "not_ready")
    assert new_request.headers["retry-after"]
    assert computed == 1, "the queued tile was not computed before the drain ended"


def test_sigterm_finishes_requests_in_flight_then_exits_zero(checkpoints):
    # A one-tile request waits up to 5 s for its batch to fill: long enough to be caught in flight.
    settings = {"MPRNET_TASKS": "denoising", "MPRNET_WEIGHTS_DENOISING": str(checkpoints["denoising"]),
                "MPRNET_DEVICE": "cpu", "MPRNET_TILE_SIZE": "32", "MPRNET_TILE_OVERLAP": "8",
                "MPRNET_MAX_BATCH_SIZE": "8", "MPRNET_MAX_BATCH_WAIT_MS": "5000", "MPRNET_MAX_PIXELS": str(MAX_PIXELS)}
    image = random_image(16, 16, seed=40)
    outcome: dict[str, httpx.Response] = {}
    with serving_process(settings) as served:
        sender = threading.Thread(target=lambda: outcome.update(response=restore(served.url, "denoising",
                                                                                  encode(image))))
        sender.start()
        wait_until(lambda: metric_value(httpx.get(f"{served.url}/metrics").text, "mprnet_queue_depth_tiles") == 1,
                   "the request to be queued")
        served.process.send_signal(signal.SIGTERM)
        in_flight_at_signal = sender.is_alive()
        sender.join(timeout=60)
        assert served.process.wait(timeout=60) == 0, served.log()
        log = served.finished_log()
    assert in_flight_at_signal, "the request finished before SIGTERM was sent"
    assert as_array(outcome["response"]).shape == (16, 16, 3)
    assert "shutting down" in log and "Traceback" not in log


def test_restores_still_running_when_the_grace_period_ends_get_the_apis_503(checkpoints):
    # Batches that wait 10 s to fill outlast a 2 s grace period. uvicorn cancels what is left at
    # its end: before, a plain restore got a bare text/plain 500 and an event stream was cut
    # with no last event (and its close raised "aclose(): asynchronous generator is already running").
    settings = {"MPRNET_TASKS": "denoising", "MPRNET_WEIGHTS_DENOISING": str(checkpoints["denoising"]),
                "MPRNET_DEVICE": "cpu", "MPRNET_TILE_SIZE": "32", "MPRNET_TILE_OVERLAP": "8",
                "MPRNET_MAX_BATCH_SIZE": "8", "MPRNET_MAX_BATCH_WAIT_MS": "10000", "MPRNET_MAX_PIXELS": str(MAX_PIXELS),
                "MPRNET_GRACEFUL_SHUTDOWN_S": "2"}
    upload = {"image": ("a.png", encode(random_image(16, 16, seed=41)), "image/png")}
    outcome: dict[str, object] = {}

    def stream(url: str) -> None:
        with httpx.stream("POST", f"{url}/v1/restore/denoising", files=upload, timeout=60,
                          headers={"Accept": "text/event-stream"}) as response:
            outcome["stream"] = response.read().decode()

    with serving_process(settings) as served:
        senders = [threading.Thread(target=lambda: outcome.update(plain=restore(served.url, "denoising",
                                                                                upload["image"][1]))),
                   threading.Thread(target=stream, args=(served.url,))]
        for sender in senders:
            sender.start()
        wait_until(lambda: metric_value(httpx.get(f"{served.url}/metrics").text, "mprnet_queue_depth_tiles") == 2,
                   "both requests to be queued")
        served.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for sender in senders:
            sender.join(timeout=60)
        answered_after_s = time.monotonic() - signalled
        assert served.process.wait(timeout=60) == 0, served.log()
        log = served.finished_log()
    body = assert_error(outcome["plain"], 503, "not_ready")
    assert "send it again" in body["error"]["message"] and outcome["plain"].headers["retry-after"]
    assert outcome["plain"].headers["x-request-id"]
    last_event = outcome["stream"].rstrip().split("\n\n")[-1].splitlines()
    assert last_event[0] == "event: error", outcome["stream"]
    error = json.loads(last_event[1].removeprefix("data: "))["error"]
    assert (error["status"], error["code"]) == (503, "not_ready") and error["retry_after_s"] > 0
    assert answered_after_s < 5  # not when the batch would have run
    assert "Traceback" not in log and "aclose()" not in log


def test_serve_exits_nonzero_when_the_weights_do_not_load(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with serving_process({"MPRNET_TASKS": "denoising", "MPRNET_WEIGHTS_DENOISING": str(broken),
                          "MPRNET_DEVICE": "cpu"}, wait_ready=False) as served:
        assert served.process.wait(timeout=60) == 1
        log = served.finished_log()
    assert "broken.pth" in log
