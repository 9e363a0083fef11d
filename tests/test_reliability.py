"""Hostile and broken input, faults and access control, against the real service on loopback.

Error cases that tests/test_service.py already sends over HTTP (unknown task, missing and doubled
field, truncated PNG, GIF, declared oversize body, chunked body just over the limit) are not
repeated here; this file adds the rest of the malformed-input battery and the cases that need a
look at the process itself (memory, bytes read, exit status).
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from service.config import Settings
from service.engine import Engine
from service.security import API_POLICY, hash_key

from service_helpers import (
    ROOT,
    decode_png,
    encode,
    metric_samples,
    metric_value,
    multipart_body,
    random_image,
    running_server,
    serving_process,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)  # hangs fail; a slow shared CI machine does not

MAX_UPLOAD_BYTES = 100_000
MAX_PIXELS = 96 * 96
KEYS = ("first-client-key", "second-clé-ключ")  # the second sent as UTF-8 bytes


@pytest.fixture(scope="module")
def weights(tiny_weights) -> Path:
    return tiny_weights(3)


def settings_for(weights: Path, **overrides) -> Settings:
    values = dict(tasks="denoising", weights_denoising=weights, device="cpu", tile_size=32, tile_overlap=8,
                  max_batch_size=8, max_batch_wait_ms=50, max_queued_tiles=64, max_upload_bytes=MAX_UPLOAD_BYTES,
                  max_pixels=MAX_PIXELS, request_timeout_s=60, log_level="warning")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def server(weights):
    with running_server(settings_for(weights)) as running:
        yield running


def restore(url: str, data: bytes, filename: str = "upload.png", content_type: str = "application/octet-stream",
            **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/restore/denoising", files={"image": (filename, data, content_type)}, timeout=60,
                      **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body


def assert_still_serving(url: str, height: int = 16, width: int = 24) -> None:
    response = restore(url, encode(random_image(height, width, seed=99)))
    assert response.status_code == 200, response.text
    assert decode_png(response.content).size == (width, height)


# -- files, built here so that each is exactly the hostile shape it is named for ----------------

def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _sixteen_bit_grey_png(height: int, width: int) -> bytes:
    values = (np.arange(height * width, dtype=np.uint32).reshape(height, width) * 300 % 65536).astype(">u2")
    return _png(width, height, 16, 0, b"".join(b"\x00" + row.tobytes() for row in values))


def _sixteen_bit_rgb_png(height: int, width: int) -> bytes:
    values = (random_image(height, width * 3, seed=3, channels=1).astype(">u2") * 257).astype(">u2")
    return _png(width, height, 16, 2, b"".join(b"\x00" + row.tobytes() for row in values))


def _corrupt_crc_png() -> bytes:
    data = bytearray(encode(random_image(20, 20, seed=5)))
    ihdr_crc = data.index(b"IHDR") + 4 + 13
    data[ihdr_crc] ^= 0xFF
    return bytes(data)


def _palette_png(transparent: bool) -> bytes:
    image = Image.fromarray(random_image(18, 22, seed=6)).quantize(16)
    return _save(image, "PNG", **({"transparency": 0} if transparent else {}))


def _frames(count: int) -> list[Image.Image]:
    return [Image.fromarray(random_image(20, 20, seed=10 + i)) for i in range(count)]


def _animated(fmt: str) -> bytes:
    first, *rest = _frames(3)
    return _save(first, fmt, save_all=True, append_images=rest, duration=100, loop=0)


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return _save(Image.fromarray(random_image(24, 40, seed=7)), "JPEG", exif=exif.tobytes(), quality=95)


RANDOM_BYTES = np.random.default_rng(8).integers(0, 256, 5000, dtype=np.uint8).tobytes()
VALID_JPEG = _save(Image.fromarray(random_image(20, 28, seed=9)), "JPEG")

# name -> (bytes, filename, declared content type, (200, (width, height), PNG mode) or (status, code))
BATTERY = {
    "zero bytes": (b"", "empty.png", "image/png", (400, "invalid_image")),
    "random bytes": (RANDOM_BYTES, "noise.png", "image/png", (400, "invalid_image")),
    "truncated jpeg": (VALID_JPEG[:len(VALID_JPEG) // 2], "half.jpg", "image/jpeg", (400, "invalid_image")),
    "png with a corrupt crc": (_corrupt_crc_png(), "crc.png", "image/png", (400, "invalid_image")),
    "text sent as an image": (b"<html>not a picture</html>\n" * 40, "page.png", "image/png", (400, "invalid_image")),
    "png named .jpg": (encode(random_image(12, 30, seed=1)), "photo.jpg", "image/jpeg", (200, (30, 12), "RGB")),
    "jpeg named .txt as text/plain": (VALID_JPEG, "notes.txt", "text/plain", (200, (28, 20), "RGB")),
    "animated gif": (_animated("GIF"), "anim.gif", "image/gif", (415, "unsupported_media_type")),
    "animated png": (_animated("PNG"), "anim.png", "image/png", (415, "unsupported_media_type")),
    "animated webp": (_animated("WEBP"), "anim.webp", "image/webp", (415, "unsupported_media_type")),
    "multi-page tiff": (_animated("TIFF"), "pages.tif", "image/tiff", (415, "unsupported_media_type")),
    "cmyk jpeg": (_save(Image.fromarray(random_image(20, 28, seed=2)).convert("CMYK"), "JPEG"), "cmyk.jpg",
                  "image/jpeg", (200, (28, 20), "RGB")),
    "16-bit grey png": (_sixteen_bit_grey_png(14, 18), "deep.png", "image/png", (200, (18, 14), "L")),
    "16-bit rgb png": (_sixteen_bit_rgb_png(10, 12), "deep-rgb.png", "image/png", (200, (12, 10), "RGB")),
    "palette png": (_palette_png(transparent=False), "palette.png", "image/png", (200, (22, 18), "RGB")),
    "palette png with transparency": (_palette_png(transparent=True), "palette-t.png", "image/png",
                                      (200, (22, 18), "RGBA")),
    "1x1 png": (encode(random_image(1, 1, seed=4)), "dot.png", "image/png", (200, (1, 1), "RGB")),
    "1x300 png": (encode(random_image(1, 300, seed=4)), "row.png", "image/png", (200, (300, 1), "RGB")),
    "300x1 png": (encode(random_image(300, 1, seed=4)), "column.png", "image/png", (200, (1, 300), "RGB")),
    "exif-rotated jpeg": (_rotated_jpeg(), "rotated.jpg", "image/jpeg", (200, (24, 40), "RGB")),
}


@pytest.mark.parametrize("case", BATTERY)
def test_malformed_and_unusual_uploads_get_their_documented_answer(server, case):
    data, filename, content_type, expected = BATTERY[case]
    response = restore(server.url, data, filename, content_type)
    if expected[0] == 200:
        _, size, mode = expected
        assert response.status_code == 200, response.text
        result = decode_png(response.content)
        assert (result.size, result.mode) == (size, mode)
    else:
        assert_error(response, *expected)
    assert_still_serving(server.url)


def test_a_tiff_that_crashed_pillow_is_a_400_not_a_500(server):
    from test_fuzz import KNOWN_TIFF_TYPE_ERRORS
    for data in KNOWN_TIFF_TYPE_ERRORS.values():
        assert_error(restore(server.url, data, "broken.tif", "image/tiff"), 400, "invalid_image")
    assert_still_serving(server.url)


def test_exif_orientation_is_applied_before_restoring(server):
    # The photo as the viewer shows it, sent without EXIF: the same pixels must come back.
    rotated = _rotated_jpeg()
    upright = np.asarray(Image.open(io.BytesIO(rotated)).transpose(Image.Transpose.ROTATE_270))
    from_exif = np.asarray(decode_png(restore(server.url, rotated, "r.jpg").content))
    from_upright = np.asarray(decode_png(restore(server.url, encode(upright)).content))
    assert from_exif.shape == from_upright.shape == (40, 24, 3)
    assert int(np.abs(from_exif.astype(int) - from_upright).max()) <= 1


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.M).group(1))


def _grey_bomb(side: int) -> bytes:
    # Rows of zeros deflate about a thousandfold: a real bomb that still fits the upload limit.
    rows = (b"\x00" * (side + 1)) * side
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows, 9))
            + _png_chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_without_allocating_its_pixels(server):
    # 8000 x 8000 greyscale inflates to 64 MB (three times that as RGB), under Pillow's own bomb
    # threshold, so only the service's header check stands between this file and the allocation.
    # The server runs in this process, so its peak resident memory is ours.
    side = 8000
    bomb = _grey_bomb(side)
    assert len(bomb) < MAX_UPLOAD_BYTES
    if not _peak_rss_reset():
        pytest.skip("/proc/self/clear_refs is not writable here, so the peak memory cannot be measured")
    baseline = _status_kib("VmHWM")
    body = assert_error(restore(server.url, bomb, "bomb.png", "image/png"), 413, "image_too_large")
    assert f"{side}x{side}" in body["error"]["message"]
    grown_bytes = (_status_kib("VmHWM") - baseline) * 1024
    assert grown_bytes < side * side / 8, f"peak memory grew by {grown_bytes} bytes"
    assert_still_serving(server.url)


def test_an_endless_chunked_upload_is_cut_off_at_the_limit(server):
    """No Content-Length, a body that would go on for 64 MB: the server answers 413 after the limit
    and stops reading, long before the client could send it all."""
    url = httpx.URL(server.url)
    head, content_type = multipart_body("image", "endless.png", b"")
    head = head[:head.index(b"\r\n--mprnet-test-boundary--")]
    chunk = os.urandom(16 * 1024)
    endless = 64 * 1024 * 1024
    sent, answer = 0, b""
    with socket.create_connection((url.host, url.port), timeout=10) as connection:
        # A small send buffer, so "sent" is close to what the server actually took.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        connection.sendall(f"POST /v1/restore/denoising HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: {content_type}"
                           f"\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        connection.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        connection.settimeout(2)
        deadline = time.monotonic() + 60
        while sent < endless and time.monotonic() < deadline:
            if select.select([connection], [], [], 0)[0]:
                break  # the server has answered
            try:
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break  # the server stopped reading
            sent += len(chunk)
        connection.settimeout(10)
        try:
            while not answer.endswith(b"}") and (part := connection.recv(65536)):
                answer += part
        except (ConnectionResetError, TimeoutError):
            pass
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"payload_too_large"' in answer
    # Loopback socket buffers can take a few MB whatever the server does; 64 MB cannot hide there.
    assert sent < 8 * 1024 * 1024, f"{sent} bytes went out before the server stopped reading"
    assert_still_serving(server.url)


def test_a_client_that_vanishes_mid_upload_leaves_nothing_behind(server):
    url = httpx.URL(server.url)
    body, content_type = multipart_body("image", "half.png", encode(random_image(64, 64, seed=12)))
    before = server.metrics()
    with socket.create_connection((url.host, url.port), timeout=10) as connection:
        connection.sendall(f"POST /v1/restore/denoising HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: {content_type}"
                           f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        # In flight: the server has taken the request and is waiting for the rest of the body.
        wait_until(lambda: metric_value(server.metrics(), "mprnet_requests_in_flight") == 1, "the upload to start")

    def finished_with() -> str | None:
        text = server.metrics()
        return text if metric_value(text, "mprnet_requests_total") > metric_value(before, "mprnet_requests_total") \
            else None

    metrics = wait_until(finished_with, "the abandoned upload to be finished with")
    assert metric_value(metrics, "mprnet_requests_in_flight") == 0
    assert metric_value(metrics, "mprnet_queue_depth_tiles") == 0
    assert metric_value(metrics, "mprnet_batch_size_count") == metric_value(before, "mprnet_batch_size_count")
    server_errors = sum(sample.value for sample in metric_samples(metrics)["mprnet_requests_total"]
                        if sample.labels["code"].startswith("5"))
    assert server_errors == sum(sample.value for sample in metric_samples(before).get("mprnet_requests_total", [])
                                if sample.labels["code"].startswith("5"))
    assert_still_serving(server.url)


def _kept_alive(host: str, port: int) -> socket.socket:
    """A connection that the server has certainly taken in: one request answered, kept open."""
    connection = socket.create_connection((host, port), timeout=10)
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return connection


def test_idle_connections_past_the_concurrency_limit_get_503_from_the_server(weights):
    """Slow or idle clients (half-sent headers) hold connections; past ``limit_concurrency`` the
    server itself turns new ones away instead of letting them pile up, and up to it serves them."""
    settings = dict(MPRNET_TASKS="denoising", MPRNET_WEIGHTS_DENOISING=str(weights), MPRNET_DEVICE="cpu",
                    MPRNET_TILE_SIZE="32", MPRNET_TILE_OVERLAP="8", MPRNET_LIMIT_CONCURRENCY="3",
                    MPRNET_LOG_LEVEL="warning")
    held: list[socket.socket] = []
    with serving_process(settings) as served:
        url = httpx.URL(served.url)
        try:
            # Two open connections and the probe's own make three: within the limit (uvicorn
            # counts the asking connection too, which once left a limit of 3 serving 2).
            held += [_kept_alive(url.host, url.port) for _ in range(2)]
            assert httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200
            connection = socket.create_connection((url.host, url.port), timeout=10)
            connection.sendall(b"POST /v1/restore/denoising HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(connection)
            # Each probe is a connection of its own, the fourth, so it is turned away once the
            # half-sent one has been taken in.
            wait_until(lambda: httpx.get(f"{served.url}/healthz", timeout=10).status_code == 503,
                       "a connection past the limit to be turned away")
        finally:
            for connection in held:
                connection.close()
        wait_until(lambda: httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200,
                   "the closed connections to free their places")
        served.process.terminate()
        assert served.process.wait(timeout=60) == 0, served.log()


# -- faults -------------------------------------------------------------------------------------

POISON = 1.0  # a pure white tile makes the patched forward pass fail


@pytest.fixture
def poisoned_server(weights, monkeypatch):
    real_forward = Engine.forward

    def forward(self, tiles):
        if any(bool((tile == POISON).all()) for tile in tiles):
            raise RuntimeError("simulated device fault")
        return real_forward(self, tiles)

    monkeypatch.setattr(Engine, "forward", forward)
    # Batches of two that wait as long as the settings allow to fill, so that two one-tile
    # requests of one shape share a batch however slowly they arrive, and a two-tile request
    # fills a batch of its own at once.
    # Engine.forward is what is poisoned here: the PyTorch backend.
    with running_server(settings_for(weights, max_batch_size=2, max_batch_wait_ms=10_000, backend="torch")) as running:
        yield running


def test_an_exception_in_one_batch_fails_only_that_batchs_requests(poisoned_server):
    white = np.full((16, 16, 3), 255, np.uint8)

    async def send_together():
        async with httpx.AsyncClient(base_url=poisoned_server.url, timeout=60) as client:
            def post(image):
                return client.post("/v1/restore/denoising", files={"image": ("i.png", encode(image))})
            # The two 16 x 16 tiles fill one batch; the 24 x 56 image is two tiles of 24 x 32, a
            # shape of their own, so a batch of their own.
            return await asyncio.gather(post(white), post(random_image(16, 16, seed=1)),
                                        post(random_image(24, 56, seed=2)))

    poisoned, neighbour, other_batch = asyncio.run(send_together())
    assert_error(poisoned, 500, "inference_failed")
    assert_error(neighbour, 500, "inference_failed")
    assert other_batch.status_code == 200 and decode_png(other_batch.content).size == (56, 24)
    metrics = poisoned_server.metrics()
    assert "simulated device fault" not in poisoned.text + metrics
    assert_still_serving(poisoned_server.url, 24, 56)
    assert httpx.get(f"{poisoned_server.url}/readyz").status_code == 200


def test_readiness_is_off_while_a_dead_worker_restarts(server, monkeypatch):
    service = server.service
    batcher = service.batcher
    metrics = service.metrics
    real_finished, real_spawn = metrics.batch_finished, batcher._spawn_worker
    crashes, dead = [], []

    def crash_once(task, size, seconds, worker):
        real_finished(task, size, seconds, worker)
        if not crashes:
            crashes.append(worker)
            raise RuntimeError("simulated bug in the worker loop")

    def restart_when_released(worker):
        # The restart, otherwise one loop turn away, waits for the test to let it happen.
        dead.append((asyncio.get_running_loop(), worker))

    monkeypatch.setattr(metrics, "batch_finished", crash_once)
    monkeypatch.setattr(batcher, "_spawn_worker", restart_when_released)
    response = restore(server.url, encode(random_image(16, 16, seed=3)))
    assert response.status_code == 200  # the batch was delivered before the loop died
    restarting = httpx.get(f"{server.url}/readyz")
    body = assert_error(restarting, 503, "not_ready")
    assert "restarting" in body["error"]["message"] and restarting.headers["retry-after"]
    # A request arriving meanwhile waits in the queue for the new worker instead of failing.
    outcome: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: outcome.update(response=restore(server.url,
                                                                              encode(random_image(16, 16, seed=4)))))
    sender.start()
    wait_until(lambda: metric_value(server.metrics(), "mprnet_queue_depth_tiles") == 1, "the request to be queued")
    (loop, worker), = wait_until(lambda: dead, "the worker's restart to be asked for")
    loop.call_soon_threadsafe(real_spawn, worker)
    sender.join(timeout=60)
    assert outcome["response"].status_code == 200, outcome["response"].text
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert batcher.running


# -- hostile weights ----------------------------------------------------------------------------

def test_no_endpoint_takes_a_path_url_or_weights_from_the_request(server):
    """Every input the API takes, listed: a new parameter must be looked at before it passes."""
    document = httpx.get(f"{server.url}/openapi.json").json()
    inputs = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                inputs.add((method, path, parameter["in"], parameter["name"]))
            for content in operation.get("requestBody", {}).get("content", {}).values():
                schema = content["schema"]
                if "$ref" in schema:
                    schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
                for name in schema.get("properties", {}):
                    inputs.add((method, path, "body", name))
    assert inputs == {("post", "/v1/restore/{task}", "path", "task"), ("post", "/v1/restore/{task}", "body", "image")}
    restore_operation = document["paths"]["/v1/restore/{task}"]["post"]
    (task,) = restore_operation["parameters"]
    assert task["schema"]["enum"] == ["denoising"]


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_serve_refuses_a_pickle_that_would_run_code_and_exits_nonzero(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"state_dict": _RunsCode(marker)}, handle)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MPRNET_")}
    env.update(MPRNET_TASKS="denoising", MPRNET_WEIGHTS_DENOISING=str(evil), MPRNET_DEVICE="cpu")
    finished = subprocess.run([sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", "0"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert finished.returncode != 0, finished.stderr
    assert not marker.exists(), "unpickling the weights ran the payload"
    assert "refused" in finished.stderr and "evil.pth" in finished.stderr
    assert "Traceback" not in finished.stderr


# -- access control -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(weights):
    settings = settings_for(weights, api_key_hashes=",".join(hash_key(key) for key in KEYS),
                            cors_origins="https://app.example")
    with running_server(settings, wait_ready=False) as running:
        running.wait_ready()  # /readyz is open by default, so the helper's wait works
        yield running


def test_restore_needs_a_valid_key_and_says_so_in_the_one_error_shape(keyed_server):
    url, image = keyed_server.url, encode(random_image(16, 16, seed=5))
    missing = assert_error(restore(url, image), 401, "missing_api_key")
    assert "X-API-Key" in missing["error"]["message"]
    assert_error(restore(url, image, headers={"X-API-Key": "guessed"}), 401, "invalid_api_key")
    assert_error(restore(url, image, headers={"Authorization": "Bearer guessed"}), 401, "invalid_api_key")
    assert_error(restore(url, image, headers={"X-API-Key": hash_key(KEYS[0])}), 401, "invalid_api_key")
    assert restore(url, image).headers["www-authenticate"].startswith("Bearer")
    assert restore(url, image, headers={"X-API-Key": KEYS[0]}).status_code == 200
    assert restore(url, image, headers={"Authorization": f"Bearer {KEYS[1]}".encode()}).status_code == 200
    assert_error(httpx.get(f"{url}/v1/models"), 401, "missing_api_key")
    assert httpx.get(f"{url}/v1/models", headers={"X-API-Key": KEYS[1].encode()}).status_code == 200
    # Open by default: probes and scrapers, and the documents that describe the API.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    assert 'code="401"' in httpx.get(f"{url}/metrics").text


def test_the_openapi_document_says_which_operations_need_a_key_and_how_to_send_it(keyed_server):
    schema = httpx.get(f"{keyed_server.url}/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes == {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                       "bearer": {"type": "http", "scheme": "bearer"}}
    restore_operation = schema["paths"]["/v1/restore/{task}"]["post"]
    assert restore_operation["security"] == [{"apiKey": []}, {"bearer": []}] and "401" in restore_operation["responses"]
    assert "security" in schema["paths"]["/v1/models"]["get"]
    for open_path in ("/healthz", "/readyz", "/metrics"):  # open by default, as the guard leaves them
        assert "security" not in schema["paths"][open_path]["get"], open_path


@pytest.mark.parametrize("path", ["/v1/restore/denoising/", "//v1/restore/denoising", "/v1/%72estore/denoising",
                                  "/v1/./restore/denoising", "/v1/restore/../restore/denoising"])
def test_spellings_of_the_restore_path_do_not_get_past_the_key(keyed_server, path):
    def send(headers: dict[str, str]) -> httpx.Response:
        request = httpx.Request("POST", f"{keyed_server.url}/placeholder", headers=headers,
                                files={"image": ("a.png", encode(random_image(8, 8, seed=1)))})
        # The target goes out as written here, not as httpx would tidy it.
        request.url = request.url.copy_with(raw_path=path.encode())
        with httpx.Client(timeout=30) as client:
            return client.send(request)

    with_key, without_key = send({"X-API-Key": KEYS[0]}), send({})
    assert with_key.status_code in (200, 404), with_key.text
    # Whatever reaches the restore endpoint with a key is refused without one; and without a key,
    # nothing under /v1/ learns more than 401 (not even that the task does not exist).
    assert without_key.status_code == (401 if with_key.status_code == 200 or path.startswith("/v1/") else 404), \
        without_key.text


def test_a_request_without_a_key_is_refused_before_its_upload_is_read(keyed_server):
    url = httpx.URL(keyed_server.url)
    with socket.create_connection((url.host, url.port), timeout=10) as connection:
        # Declares 90 kB and sends none of it: only an answer that reads no body can come back.
        connection.sendall(f"POST /v1/restore/denoising HTTP/1.1\r\nHost: {url.host}\r\n"
                           f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 90000\r\n\r\n".encode())
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


def test_health_and_metrics_can_be_put_behind_the_key(weights):
    settings = settings_for(weights, api_key_hashes=hash_key(KEYS[0]), protect_health=True, protect_metrics=True)
    with running_server(settings, wait_ready=False) as running:
        wait_until(lambda: httpx.get(f"{running.url}/readyz", headers={"X-API-Key": KEYS[0]}).status_code == 200,
                   "the service to become ready")
        for path in ("/healthz", "/readyz", "/metrics"):
            assert_error(httpx.get(f"{running.url}{path}"), 401, "missing_api_key")
            assert httpx.get(f"{running.url}{path}", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
        schema = httpx.get(f"{running.url}/openapi.json").json()
        assert all("security" in schema["paths"][path]["get"] for path in ("/healthz", "/readyz", "/metrics"))


def test_plain_keys_are_not_taken_as_hashes():
    with pytest.raises(ValidationError, match="sha256 hex digests"):
        Settings(api_key_hashes="my-secret-key")
    assert Settings(api_key_hashes=hash_key("k").upper()).api_key_hashes == (hash_key("k"),)
    assert "api_key_hashes" not in Settings(api_key_hashes=hash_key("k")).summary()


def test_the_digest_to_configure_is_printed_for_a_key_on_stdin():
    made = subprocess.run([sys.executable, "-m", "service.security"], input="first-client-key\n", cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and made.stdout.strip() == hash_key("first-client-key")
    Settings(api_key_hashes=made.stdout.strip())  # accepted as configuration as printed


@pytest.mark.parametrize("origin", ["https://app.example/", "app.example", "https://app.example/page", "null"])
def test_an_origin_no_browser_sends_is_refused_at_start_up(origin):
    # A browser's Origin has no path and no trailing slash: configured so, CORS never matched
    # and the page failed with nothing said on the server.
    with pytest.raises(ValidationError, match="scheme://host"):
        Settings(cors_origins=f"https://ok.example,{origin}")
    assert Settings(cors_origins="https://app.example:8443,http://[::1]:3000,*").cors_origins == (
        "https://app.example:8443", "http://[::1]:3000", "*")


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(f"{url}/v1/restore/denoising", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"})


def test_cors_answers_only_the_configured_origins(keyed_server, server):
    allowed = _preflight(keyed_server.url, "https://app.example")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    refused = _preflight(keyed_server.url, "https://evil.example")
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    for answer in (allowed, refused):  # answered by the CORS layer, and marked all the same
        assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["content-security-policy"] == API_POLICY
    # The browser can read a refusal too, so the page can tell its user the key is wrong.
    denied = restore(keyed_server.url, encode(random_image(8, 8, 1)), headers={"Origin": "https://app.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"
    # Unconfigured, there is no CORS at all: no preflight answer, no header on a response.
    off = _preflight(server.url, "https://app.example")
    assert off.status_code >= 400 and "access-control-allow-origin" not in off.headers
    simple = restore(server.url, encode(random_image(8, 8, 1)), headers={"Origin": "https://app.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers
