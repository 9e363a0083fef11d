"""Slow clients against the real server on loopback, started the way `serve` starts it
(``service.server.uvicorn_config``): half-sent heads and stalled bodies are cut within their limits,
a stalled upload leaves no spooled file open, a slow but steady upload still succeeds, and the
server keeps serving. The attacks are built here from raw sockets.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.config import Settings
from service.security import security_headers
from service.server import uvicorn_config

from service_helpers import (
    RunningServer,
    decode_png,
    encode,
    metric_value,
    multipart_body,
    random_image,
    tiny_checkpoint,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

# Short limits, so that each attack is cut in about a second.
HEAD_TIMEOUT_S = 1.0
BODY_MIN_RATE = 2000  # bytes/s
BODY_WINDOW_S = 1.0
# How late a cut may come on a loaded 2-core machine before the test calls it missed.
SLACK_S = 3.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("weights") / "denoising.safetensors", seed=5)


@contextmanager
def serving(settings: Settings) -> Iterator[RunningServer]:
    """The app under uvicorn as `serve` configures it, on a free loopback port."""
    app = create_app(settings)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(settings, app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    running = RunningServer(url=f"http://127.0.0.1:{listener.getsockname()[1]}", app=app, server=server)
    try:
        running.wait_ready()
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


@pytest.fixture(scope="module")
def server(weights) -> Iterator[RunningServer]:
    settings = Settings(tasks="denoising", weights_denoising=weights, device="cpu", tile_size=32, tile_overlap=8,
                        max_batch_size=4, max_pixels=96 * 96, request_timeout_s=60, log_level="warning",
                        request_head_timeout_s=HEAD_TIMEOUT_S, request_body_min_rate=BODY_MIN_RATE,
                        request_body_rate_window_s=BODY_WINDOW_S)
    with serving(settings) as running:
        yield running


def connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    # Bounds every recv below: a connection the server never cuts fails the test instead of hanging it.
    sock.settimeout(HEAD_TIMEOUT_S + BODY_WINDOW_S * 2 + SLACK_S + 5)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed with our bytes unread: a cut all the same
            return received
        if not chunk:
            return received
        received += chunk


def upload_head(content_length: int, content_type: str) -> bytes:
    return (f"POST /v1/restore/denoising HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {content_length}\r\nConnection: close\r\n\r\n").encode()


def assert_still_serving(server: RunningServer) -> None:
    image = random_image(40, 40, seed=11)
    response = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("a.png", encode(image))},
                          timeout=60)
    assert response.status_code == 200, response.text
    assert decode_png(response.content).size == (40, 40)


def spooled_files_open(directory: Path) -> list[str]:
    """This process's open files in ``directory``; Linux's unnamed temporary files included,
    which never appear in a listing of it."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed since the listing
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


def test_a_half_sent_head_is_cut_with_408_within_the_limit(server):
    sock = connect(server)
    with sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the head never ends
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"request_timeout"' in answer
    # Written to the socket by hand, below the app's middleware, and marked all the same.
    head = answer.split(b"\r\n\r\n")[0].lower()
    for name, value in security_headers():
        assert b"\r\n" + name + b": " + value.lower() + b"\r\n" in head + b"\r\n", name
    assert HEAD_TIMEOUT_S - 0.05 <= elapsed <= HEAD_TIMEOUT_S + SLACK_S, elapsed
    assert_still_serving(server)


def test_a_half_head_pipelined_behind_a_request_gets_its_408_at_the_head_deadline(weights):
    # A head deadline longer than uvicorn's 5 s keep-alive, as the default 20 s is: the keep-alive
    # timer used to close the connection at 5 s with no answer to the request begun.
    head_timeout_s = 6.0
    settings = Settings(tasks="denoising", weights_denoising=weights, device="cpu", tile_size=32, tile_overlap=8,
                        max_batch_size=4, max_pixels=96 * 96, log_level="warning",
                        request_head_timeout_s=head_timeout_s)
    with serving(settings) as running:
        sock = connect(running)
        with sock:
            sock.settimeout(30)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         b"POST /v1/restore/denoising HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            started = time.monotonic()
            answer = read_until_closed(sock)
            elapsed = time.monotonic() - started
    first, _, rest = answer.partition(b"HTTP/1.1 408 ")
    assert first.startswith(b"HTTP/1.1 200 ") and b'"request_timeout"' in rest, answer
    assert head_timeout_s - 0.05 <= elapsed <= head_timeout_s + SLACK_S, elapsed


def test_a_head_dripped_byte_by_byte_is_cut_at_the_deadline_not_kept_alive_by_each_byte(server):
    sock = connect(server)
    with sock:
        started = time.monotonic()
        closed_after = None
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            time.sleep(0.05)  # the attack's pace: a byte every 50 ms, far inside any idle timeout
    assert closed_after is not None, "the server kept reading a head for the whole drip"
    assert closed_after <= HEAD_TIMEOUT_S + SLACK_S, closed_after
    assert_still_serving(server)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server):
    sock = connect(server)
    with sock:
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer == b""
    assert elapsed <= HEAD_TIMEOUT_S + SLACK_S, elapsed


@pytest.mark.parametrize("sent", [1024, 2 * 1024 * 1024], ids=["1KB-in-memory", "2MB-spooled-to-disk"])
def test_an_upload_that_declares_30MB_and_stalls_is_cut_and_leaves_no_temporary_file(server, sent, tmp_path,
                                                                                      monkeypatch):
    # Starlette spools an upload past 1 MB to tempfile's directory; point it at one of our own.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    declared = 30 * 1024 * 1024
    body, content_type = multipart_body("image", "big.png", b"\0" * declared)
    sock = connect(server)
    with sock:
        sock.sendall(upload_head(len(body), content_type) + body[:sent])
        stalled_at = time.monotonic()
        if sent > 1024 * 1024:
            deadline = stalled_at + 10
            while not spooled_files_open(tmp_path):  # the upload really did reach a file
                assert time.monotonic() < deadline, "the upload was never spooled to a file"
                time.sleep(0.01)
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - stalled_at
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    # The window running when the stall began may still meet the rate; the next one cannot.
    assert elapsed <= 2 * BODY_WINDOW_S + SLACK_S, elapsed
    deadline = time.monotonic() + 10
    while spooled_files_open(tmp_path):  # closed by the multipart parser as it sees the disconnect
        assert time.monotonic() < deadline, f"still open: {spooled_files_open(tmp_path)}"
        time.sleep(0.01)
    assert list(tmp_path.iterdir()) == []
    assert_still_serving(server)


def test_a_slow_but_steady_upload_above_the_minimum_rate_succeeds(server):
    image = random_image(96, 96, seed=12)
    body, content_type = multipart_body("image", "steady.png", encode(image))
    chunk, pause_s = 800, 0.1  # about 8 KB/s against a floor of 2 KB/s, for several rate windows
    assert len(body) / (chunk / pause_s) > 2 * BODY_WINDOW_S
    sock = connect(server)
    with sock:
        sock.sendall(upload_head(len(body), content_type))
        for offset in range(0, len(body), chunk):
            sock.sendall(body[offset:offset + chunk])
            time.sleep(pause_s)
        answer = read_until_closed(sock)
    head, _, png = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert decode_png(png).size == (96, 96)
    assert_still_serving(server)


def test_uploads_that_declare_the_largest_body_and_then_trickle_do_not_hold_other_uploads_out(server):
    # Four uploads declaring the largest body fill the memory budget's default (four such bodies)
    # if a declaration is what counts. Each then trickles above the rate floor, so no limit cuts it.
    declared = server.service.settings.max_upload_bytes
    assert server.service.budget.max_bytes == 4 * declared
    head = upload_head(declared, "multipart/form-data; boundary=b")
    head += b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    stop = threading.Event()
    tricklers = [connect(server) for _ in range(4)]
    sent = [0] * len(tricklers)

    def trickle(index: int, sock: socket.socket) -> None:
        sock.sendall(head)
        while not stop.wait(0.1):
            sock.sendall(b"\0" * (BODY_MIN_RATE // 5))  # twice the floor
            sent[index] += BODY_MIN_RATE // 5

    threads = [threading.Thread(target=trickle, args=pair, daemon=True) for pair in enumerate(tricklers)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2 * BODY_WINDOW_S)  # past a rate window: the trickles are seen, and not cut
        assert_still_serving(server)
        # What arrived is what is held: a few kilobytes, nowhere near the four declared bodies. (The
        # small upload's bytes leave the budget just after its answer, a moment later on a loaded
        # machine: hence a wait, which four held declarations would never end.)
        wait_until(lambda: 0 < server.service.budget.bytes <= sum(sent) + 4 * len(head),
                   "the budget to hold only the bytes that arrived", timeout=10)
        assert sum(sent) < server.service.budget.max_bytes / 1000
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for sock in tricklers:
            sock.close()
    wait_until(lambda: server.service.budget.bytes == 0, "the trickles' bytes to leave the budget", timeout=20)


def test_an_upload_that_would_pass_the_memory_budget_as_it_arrives_gets_503_and_the_others_go_on(weights):
    settings = Settings(tasks="denoising", weights_denoising=weights, device="cpu", tile_size=32, tile_overlap=8,
                        max_pixels=96 * 96, log_level="warning", max_upload_bytes=50_000,
                        max_inflight_bytes=60_000, request_body_min_rate=BODY_MIN_RATE,
                        request_body_rate_window_s=BODY_WINDOW_S)
    filler, filler_type = multipart_body("image", "zeros.png", b"\0" * 45_000)
    photo, photo_type = multipart_body("image", "photo.png", encode(random_image(96, 96, seed=13)))
    assert 20_000 < len(photo) < 50_000
    with serving(settings) as running:
        budget = running.service.budget
        first, second = connect(running), connect(running)
        with first, second:
            first.sendall(upload_head(len(filler), filler_type) + filler[:5_000])
            wait_until(lambda: budget.bytes >= 5_000, "the first upload's bytes in the budget", timeout=10)
            # Admitted: what has arrived (5 KB) leaves room for its whole declared body.
            second.sendall(upload_head(len(photo), photo_type) + photo[:20_000])
            wait_until(lambda: budget.bytes >= 25_000, "the second upload's bytes in the budget", timeout=10)
            first.sendall(filler[5_000:45_000])  # 45 KB of its own beside the second's 20: past 60 KB
            refused = read_until_closed(first)
            assert refused.startswith(b"HTTP/1.1 503 "), refused[:300]
            assert b'"over_capacity"' in refused and b"retry-after: " in refused.lower()
            wait_until(lambda: budget.bytes == 20_000, "only the second upload's bytes in the budget", timeout=10)
            second.sendall(photo[20_000:])
            answer = read_until_closed(second)
        head, _, png = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert decode_png(png).size == (96, 96)
        wait_until(lambda: budget.bytes == 0, "every body to leave the budget", timeout=10)


def test_an_upload_still_arriving_at_shutdown_gets_503_not_ready_just_before_the_grace_ends(weights):
    grace_s = 3.0
    settings = Settings(tasks="denoising", weights_denoising=weights, device="cpu", tile_size=32, tile_overlap=8,
                        max_pixels=96 * 96, log_level="warning", graceful_shutdown_s=grace_s,
                        request_body_min_rate=BODY_MIN_RATE, request_body_rate_window_s=BODY_WINDOW_S)
    body, content_type = multipart_body("image", "slow.png", b"\0" * 200_000)
    stop = threading.Event()
    with serving(settings) as running:
        sock = connect(running)

        def trickle() -> None:  # above the rate floor, so only the shutdown can end it
            try:
                sock.sendall(upload_head(len(body), content_type) + body[:1000])
                for offset in range(1000, len(body), BODY_MIN_RATE // 5):
                    if stop.wait(0.1):
                        return
                    sock.sendall(body[offset:offset + BODY_MIN_RATE // 5])
            except OSError:
                return  # cut

        thread = threading.Thread(target=trickle, daemon=True)
        with sock:
            thread.start()
            wait_until(lambda: running.service.budget.bytes > 0, "the upload to start arriving", timeout=10)
            running.server.should_exit = True  # what SIGTERM does
            signalled = time.monotonic()
            answer = read_until_closed(sock)
            elapsed = time.monotonic() - signalled
            stop.set()
            thread.join(10)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer[:300]
    assert b"application/json" in head and b"retry-after: 1" in head.lower() and b'"not_ready"' in payload
    assert grace_s - 1.0 - 0.5 <= elapsed <= grace_s + SLACK_S, elapsed


def test_a_client_that_leaves_during_its_upload_is_counted_as_gone_499_not_as_a_bad_request(server):
    def count(code: str) -> float:
        return metric_value(server.metrics(), "mprnet_requests_total", code=code)

    before = {code: count(code) for code in ("400", "499")}
    body, content_type = multipart_body("image", "half.png", encode(random_image(64, 64, seed=14)))
    with connect(server) as sock:
        sock.sendall(upload_head(len(body), content_type) + body[:len(body) // 2])
        wait_until(lambda: server.service.budget.bytes > 0, "the upload to start arriving", timeout=10)
    wait_until(lambda: count("499") == before["499"] + 1, "the abandoned upload to be counted", timeout=10)
    assert count("400") == before["400"]
