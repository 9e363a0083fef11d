"""Restores answered as Server-Sent Events (``Accept: text/event-stream``), against the real server:
progress, the same PNG as a plain request, errors as events, keep-alives while queued, a client
that closes the stream, and what stays an ordinary HTTP error."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.event_stream import EventStreamResponse, wants_event_stream

from attacks import smooth_image
from service_helpers import (
    ROOT,
    decode_png,
    encode,
    gated_forward,
    metric_value,
    multipart_body,
    running_server,
    tiny_checkpoint,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

STREAM = {"Accept": "text/event-stream"}
KODAK = ROOT.parent / "shared" / "datasets" / "eval" / "Kodak24"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("stream") / "denoising.safetensors", seed=4)


def _settings(weights, **overrides) -> Settings:
    values = dict(tasks="denoising", weights_denoising=weights, device="cpu", backend="torch", tile_size=32,
                  tile_overlap=8, max_batch_size=1, max_queued_tiles=400, max_upload_bytes=2_000_000,
                  max_pixels=400 * 400, request_timeout_s=60)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def server(weights):
    with running_server(_settings(weights, stream_keepalive_s=0.2)) as running:
        yield running


@dataclass
class Stream:
    status: int
    headers: httpx.Headers
    events: list[tuple[str, dict]] = field(default_factory=list)  # (name, data) in order
    comments: list[str] = field(default_factory=list)

    def named(self, name: str) -> list[dict]:
        return [data for event, data in self.events if event == name]


def read_stream(response: httpx.Response, on_event=None) -> Stream:
    """The events of a text/event-stream response as they arrive (``on_event(name, data)`` after
    each); a non-stream response's body as one event named by its status."""
    stream = Stream(response.status_code, response.headers)
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        stream.events.append((str(response.status_code), json.loads(response.read())))
        return stream
    name, data = "message", []
    for line in response.iter_lines():
        if line.startswith(":"):
            stream.comments.append(line[1:].strip())
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            stream.events.append((name, json.loads("\n".join(data))))
            if on_event is not None and on_event(name, stream.events[-1][1]) is False:
                break
            name, data = "message", []
    return stream


def post_stream(url: str, task: str, image: bytes, headers=STREAM, on_event=None, timeout: float = 120) -> Stream:
    with httpx.stream("POST", f"{url}/v1/restore/{task}", files={"image": ("photo.png", image)}, headers=headers,
                      timeout=timeout) as response:
        return read_stream(response, on_event)


def assert_progress_then_result(stream: Stream) -> tuple[list[dict], dict]:
    assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in stream.events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"}, names
    progress = stream.named("progress")
    done = [event["done"] for event in progress]
    assert done[0] == 0 and done == sorted(done) and len(set(done)) == len(done), done
    total = progress[0]["total"]
    assert all(event["total"] == total for event in progress) and done[-1] == total
    return progress, stream.named("result")[0]


def test_a_stream_reports_progress_then_the_png_a_plain_request_returns(server):
    image = encode(smooth_image(200, 260))  # 8 x 11 tiles of 32 px, one per batch
    stream = post_stream(server.url, "denoising", image, headers={**STREAM, "X-Request-ID": "stream-1"})
    progress, result = assert_progress_then_result(stream)
    assert progress[0]["total"] == 88 and len(progress) >= 3
    assert any("eta_s" in event for event in progress[1:])
    plain = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("photo.png", image)}, timeout=60)
    assert plain.status_code == 200
    png = base64.b64decode(result["png_base64"])
    assert np.array_equal(np.asarray(decode_png(png)), np.asarray(decode_png(plain.content)))
    assert (result["width"], result["height"], result["request_id"]) == (260, 200, "stream-1")
    assert set(result["timings"]) == {"decode", "queue", "inference", "encode", "total"}
    assert stream.headers["x-request-id"] == "stream-1" and stream.headers["cache-control"] == "no-cache"


def test_the_first_progress_event_estimates_the_time_left_from_the_services_recent_pace(server):
    image = encode(smooth_image(200, 260))
    plain = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("a.png", image)}, timeout=60)
    assert plain.status_code == 200
    progress, _ = assert_progress_then_result(post_stream(server.url, "denoising", image))
    first = progress[0]
    # 88 tiles at the pace the plain request just measured: seconds, not zero.
    assert first["done"] == 0 and first["eta_s"] > 0
    assert "eta_s" in progress[-1] and progress[-1]["eta_s"] == 0


def test_a_bad_image_ends_the_stream_with_the_usual_error_body_and_the_service_goes_on(server):
    before = server.metrics()
    stream = post_stream(server.url, "denoising", b"this is not an image")
    assert stream.status == 200
    assert [name for name, _ in stream.events] == ["error"]
    error = stream.named("error")[0]["error"]
    assert error["code"] == "invalid_image" and error["status"] == 400 and error["message"]
    plain = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("x.png", b"this is not an image")})
    assert {key: plain.json()["error"][key] for key in ("code", "message")} == \
        {key: error[key] for key in ("code", "message")}
    # Counted as what it was, not as the stream's 200.
    after = server.metrics()
    assert metric_value(after, "mprnet_requests_total", code="400") - \
        metric_value(before, "mprnet_requests_total", code="400") == 2
    assert_progress_then_result(post_stream(server.url, "denoising", encode(smooth_image(40, 40))))


@pytest.mark.parametrize("case", ["unknown task", "declared oversize body", "missing field"])
def test_what_is_refused_before_the_stream_starts_stays_an_ordinary_http_error(server, case):
    url = f"{server.url}/v1/restore/denoising"
    if case == "unknown task":
        response = httpx.post(f"{server.url}/v1/restore/colourising", files={"image": ("a.png", b"x")}, headers=STREAM)
        status, code = 404, "unknown_task"
    elif case == "declared oversize body":
        response = httpx.post(url, content=b"x" * 2_000_001, headers={**STREAM, "Content-Type": "image/png"})
        status, code = 413, "payload_too_large"
    else:
        response = httpx.post(url, files={"picture": ("a.png", b"x")}, headers=STREAM)
        status, code = 422, "validation_error"
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(("accept", "streams"), [
    ("text/event-stream", True), ("TEXT/Event-Stream", True), ("text/event-stream, image/png", True),
    ("image/png;q=0.5, text/event-stream", True), ("*/*;q=0.1, text/event-stream;q=0.2", True),
    ("text/event-stream;q=0", False), ("image/png", False), ("*/*", False), ("", False),
    ("text/event-stream;q=oops", False),
    # The client ranks the PNG higher, by name or by a wider range that covers it.
    ("image/png, text/event-stream;q=0.5", False), ("image/*, text/event-stream;q=0.9", False),
    ("image/png;q=0.9, */*;q=0.1, text/event-stream;q=0.8", False)])
def test_the_stream_is_chosen_when_the_accept_header_ranks_it_at_least_as_high_as_the_png(accept, streams):
    assert wants_event_stream(accept) is streams


def test_without_the_accept_header_nothing_changes(server):
    response = httpx.post(f"{server.url}/v1/restore/denoising", headers={"Accept": "text/event-stream;q=0, image/png"},
                          files={"image": ("a.png", encode(smooth_image(40, 40)))})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


@pytest.fixture
def gated(weights):
    """A server whose forward passes wait for ``gate.release``; keep-alives every 0.2 s."""
    with (running_server(_settings(weights, stream_keepalive_s=0.2, request_timeout_s=30)) as running,
          gated_forward(running, "denoising") as gate):
        yield running, gate


def test_keep_alive_comments_flow_while_the_restore_waits_for_the_device(gated):
    server, gate = gated
    seen: list[float] = []

    def release_after_a_second(name, data):
        seen.append(time.monotonic())
        if name == "progress" and data["done"] == 0:
            threading.Timer(1.0, gate.release.set).start()

    stream = post_stream(server.url, "denoising", encode(smooth_image(40, 40)), on_event=release_after_a_second)
    assert_progress_then_result(stream)
    # One held second at one keep-alive per 0.2 s of silence.
    assert stream.comments.count("keep-alive") >= 3, stream.comments


def test_the_deadline_ends_the_stream_with_a_timeout_error_event(weights):
    settings = _settings(weights, stream_keepalive_s=0.2, request_timeout_s=1.5)
    with running_server(settings) as server:
        with gated_forward(server, "denoising"):
            stream = post_stream(server.url, "denoising", encode(smooth_image(40, 40)))
        assert [name for name, _ in stream.events] == ["progress", "error"]
        assert stream.named("error")[0]["error"] | {"message": ""} == {"code": "timeout", "status": 504,
                                                                       "message": ""}
        assert metric_value(server.metrics(), "mprnet_requests_total", code="504") == 1


def test_a_client_that_closes_the_stream_cancels_its_restore(gated):
    server, gate = gated
    before = server.metrics()
    opened = []

    def close_once_queued(name, data):
        opened.append(metric_value(server.metrics(), "mprnet_progress_streams_open", task="denoising"))
        return not (name == "progress" and data["done"] == 0)  # False: stop reading, close the stream

    image = encode(smooth_image(200, 200))  # 64 tiles: the first held in the forward pass, the rest queued
    post_stream(server.url, "denoising", image, on_event=close_once_queued)
    assert opened == [1]

    def cancelled() -> str | None:
        text = server.metrics()
        return text if metric_value(text, "mprnet_restores_cancelled_by_client_total") == 1 else None

    after = wait_until(cancelled, "the closed stream to cancel its restore")
    assert metric_value(after, "mprnet_queue_depth_tiles") == 0, "the closed stream's tiles stayed queued"
    assert metric_value(after, "mprnet_progress_streams_open", task="denoising") == 0
    gate.release.set()
    ok = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("a.png", encode(smooth_image(40, 40)))},
                    timeout=60)
    assert ok.status_code == 200
    text = server.metrics()
    # Of the 64 tiles only the one already in the forward pass was computed (and discarded).
    computed = metric_value(text, "mprnet_batch_size_sum") - metric_value(before, "mprnet_batch_size_sum")
    assert computed == 1 + 4, computed
    assert metric_value(text, "mprnet_requests_total", code="499") == 1


def test_a_2000x1500_photo_on_the_default_cpu_service_streams_progress_and_the_plain_pixels():
    """Issue 19's acceptance check: the service as `serve` runs it on a CPU (bundled weights, the
    default backend and tiling), a photo of 2000x1500 with noise on it."""
    if not KODAK.is_dir():
        pytest.skip("../shared/datasets is not beside the checkout")
    with Image.open(KODAK / "kodim05.png") as photo:
        pixels = np.asarray(photo.convert("RGB").resize((2000, 1500), Image.Resampling.LANCZOS), dtype=np.float32)
    noisy = np.clip(pixels + np.random.default_rng(19).normal(0, 15, pixels.shape), 0, 255).round().astype(np.uint8)
    upload = encode(noisy)
    with running_server(Settings(tasks="denoising")) as server:
        stream = post_stream(server.url, "denoising", upload, timeout=600)
        plain = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("photo.png", upload)}, timeout=600)
        backend = server.service.cards["denoising"].backend
    progress, result = assert_progress_then_result(stream)
    assert len(progress) >= 3, progress
    assert plain.status_code == 200, plain.text
    streamed = np.asarray(decode_png(base64.b64decode(result["png_base64"])))
    assert streamed.shape == (1500, 2000, 3)
    assert np.array_equal(streamed, np.asarray(decode_png(plain.content))), f"backend {backend}"


def test_streams_cut_at_random_points_all_at_once_leave_nothing_behind(weights):
    """Thirty clients at once: a third hang up half way through the upload, the rest reset the
    connection at a random moment after sending it, some after reading a little of the stream."""
    # Room for all thirty in the queue and the memory budget, so that none is refused before it starts.
    settings = _settings(weights, max_queued_tiles=4000, stream_keepalive_s=0.2, max_inflight_bytes=30 * 2_000_000,
                         max_inflight_pixels=30 * 400 * 400, request_timeout_s=600)
    body, content_type = multipart_body("image", "cut.png", encode(smooth_image(300, 300)))
    # The forward pass is held throughout: every tile a cut stream leaves behind stays visible in
    # the queue until its restore is cancelled, and none finishes first.
    with running_server(settings) as server, gated_forward(server, "denoising") as gate:
        url = httpx.URL(server.url)
        head = (f"POST /v1/restore/denoising HTTP/1.1\r\nHost: {url.host}\r\nAccept: text/event-stream\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        delays = np.random.default_rng(7).uniform(0, 1.5, 30)

        def cut(index: int) -> None:
            with socket.create_connection((url.host, url.port), timeout=30) as connection:
                if index % 3 == 0:
                    connection.sendall(head + body[:len(body) // 2])
                    time.sleep(delays[index] / 3)
                else:
                    connection.sendall(head + body)
                    time.sleep(delays[index])
                    if index % 3 == 2:
                        connection.recv(100)
                # Linger 0: the close sends a reset, as a killed client's kernel would.
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        clients = [threading.Thread(target=cut, args=(index,)) for index in range(30)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)

        def settled() -> str | None:
            text = server.metrics()
            gauges = ("mprnet_progress_streams_open", "mprnet_requests_in_flight", "mprnet_queue_depth_tiles")
            return text if all(metric_value(text, name) == 0 for name in gauges) else None

        # Well before the deadline would drop the tiles anyway.
        metrics = wait_until(settled, "every cut stream to be closed and its tiles dropped", timeout=30)
        # Each ended as a client gone (499): a cancelled restore, or an upload cut before it was
        # all read; none as a server error, nor as a bad request.
        assert metric_value(metrics, "mprnet_requests_total", code="499") == 30, metrics
        assert metric_value(metrics, "mprnet_requests_total") == 30, metrics
        assert 1 <= metric_value(metrics, "mprnet_restores_cancelled_by_client_total") <= 30
        assert (server.service.budget.bytes, server.service.budget.pixels) == (0, 0)
        gate.release.set()
        assert_progress_then_result(post_stream(server.url, "denoising", encode(smooth_image(64, 64))))


def test_a_stream_cancelled_by_the_server_stops_its_events_and_still_closes():
    # What uvicorn does to a response still running when its shutdown grace period ends. The
    # cancellation used to leave the events' generator running in a task of its own, so closing
    # it raised "aclose(): asynchronous generator is already running" and on_close never ran
    # (the open-streams gauge stayed up).
    async def scenario() -> tuple[list[str], list[dict]]:
        closed: list[str] = []

        async def events():
            try:
                yield b": restoring\n\n"
                await asyncio.Event().wait()  # a restore still waiting for the device
            finally:
                closed.append("events")

        async def receive() -> dict:
            await asyncio.Event().wait()  # the client stays
            return {}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        response = EventStreamResponse(events(), on_close=lambda: closed.append("on_close"))
        running = asyncio.create_task(response({"type": "http"}, receive, send))
        await asyncio.sleep(0.1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        return closed, sent

    closed, sent = asyncio.run(scenario())
    assert closed == ["events", "on_close"]
    assert [message.get("body") for message in sent[1:]] == [b": restoring\n\n"]
