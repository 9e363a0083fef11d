"""The page at `/`, driven in headless Chromium (Debian's, through Playwright) against the real
service: a photo goes in through the file input, a bar counts its tiles while the service works,
the restored image and its timings come out, a restore can be cancelled, and an upload the API
refuses shows the API's own message.

Screenshots go to $PYTEST_ARTIFACTS, else tests/artifacts/. Without Chromium or Playwright the
tests skip, unless CI is set: there a missing browser must fail the build, not hide it.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.config import Settings

from service_helpers import decode_png, encode, metric_value, running_server, wait_until

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("PYTEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
# Odd sizes, so that an off-by-one in tiling, display or download would show.
PHOTO_SIZE = (203, 137)  # width, height
TIMEOUT_MS = 60_000
# On the tiled server: 8 x 8 tiles of 32 px overlapping by 8, one per forward pass.
TILED_SIDE, TILED_TILES = 200, 64


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test (see .ci/deps.d/30-chromium.sh)")
    pytest.skip(reason)


def _photo(width: int = PHOTO_SIZE[0], height: int = PHOTO_SIZE[1]) -> np.ndarray:
    """A photo-like picture: smooth light, hard edges and sensor noise, the things the networks
    were trained to tell apart."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 80 * y / height, 140 + 60 * y / height, 230 - 40 * y / height], axis=-1)
    sun = ((x - 0.7 * width) ** 2 + (y - 0.3 * height) ** 2) < (0.12 * height) ** 2
    hill = y > height * (0.65 + 0.1 * np.sin(x / 17))
    picture = sky
    picture[sun] = (250, 220, 120)
    picture[hill] = np.stack([40 + 30 * np.sin(x / 5), 120 + 20 * np.cos(y / 7), 60 + 0 * x], axis=-1)[hill]
    noise = np.random.default_rng(8).normal(0, 12, picture.shape)
    return np.clip(picture + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    with sync_playwright() as playwright:
        # The system's Chromium: Playwright's own browser download needs a network CI may not have.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tiny_weights):
    settings = Settings(tasks=("denoising", "deraining"), device="cpu", backend="torch", tile_size=64, tile_overlap=8,
                        max_batch_size=4, weights_denoising=tiny_weights(1), weights_deraining=tiny_weights(2))
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def tiled_server(tiny_weights):
    """Many small tiles and one per forward pass, so that a restore reports progress many times;
    uploads past 300 kB are refused before the stream starts."""
    settings = Settings(tasks=("denoising",), device="cpu", backend="torch", tile_size=32, tile_overlap=8,
                        max_batch_size=1, max_upload_bytes=300_000, weights_denoising=tiny_weights(3))
    with running_server(settings) as running:
        yield running


@contextmanager
def _page_of(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 1300}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    # Nothing outside the service may be fetched: the page must work on an offline machine.
    page.on("request", lambda request: None if request.url.startswith((server.url, "blob:", "data:"))
            else problems.append(f"external request: {request.url}"))
    page.problems = problems
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser, server):
    with _page_of(browser, server) as page:
        yield page


@pytest.fixture
def tiled_page(browser, tiled_server):
    with _page_of(browser, tiled_server) as page:
        yield page


class _Turnstile:
    """Lets the worker's forward passes through one permit each, so that a test decides how far a
    restore gets before it looks at the page."""

    def __init__(self, forward):
        self.forward = forward
        self.permits = threading.Semaphore(0)
        self.opened = threading.Event()

    def __call__(self, tiles):
        if not self.opened.is_set():
            assert self.permits.acquire(timeout=60), "the test never let the forward pass through"
        return self.forward(tiles)

    def let_through(self, passes: int) -> None:
        self.permits.release(passes)

    def open(self) -> None:
        self.opened.set()
        self.permits.release()  # for the pass already waiting


class _HeldCutting:
    """The tiled server's pipeline, but cutting an image into tiles waits for ``release``: the
    restore stays in the phase before its first progress event."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.release = threading.Event()

    def cut(self, decoded):
        assert self.release.wait(60), "the test never released the cutting"
        return self.pipeline.cut(decoded)

    def __getattr__(self, name: str):
        return getattr(self.pipeline, name)


@pytest.fixture
def held_cutting(tiled_server, monkeypatch):
    held = _HeldCutting(tiled_server.service.pipeline)
    monkeypatch.setattr(tiled_server.service, "pipeline", held)
    try:
        yield held
    finally:
        held.release.set()


@pytest.fixture
def turnstile(tiled_server):
    """The tiled server's forward passes wait for ``let_through`` (or ``open``) while the test runs."""
    worker = tiled_server.service.batcher._workers[0]
    gate = _Turnstile(worker.forward_by_task["denoising"])
    worker.forward_by_task["denoising"] = gate
    try:
        yield gate
    finally:
        gate.open()
        worker.forward_by_task["denoising"] = gate.forward


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _open(page, server) -> None:
    page.goto(f"{server.url}/")
    page.wait_for_selector("#task-select:enabled")


def _downloaded(page) -> bytes:
    return bytes(page.evaluate("async () => Array.from(new Uint8Array("
                               "await (await fetch(document.getElementById('download').href)).arrayBuffer()))"))


def _plain_restore(server, task: str, upload: bytes) -> bytes:
    response = httpx.post(f"{server.url}/v1/restore/{task}", files={"image": ("upload", upload)}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return response.content


def assert_same_pixels(png: bytes, expected_png: bytes) -> None:
    shown, expected = decode_png(png), decode_png(expected_png)
    assert (shown.mode, shown.size) == (expected.mode, expected.size)
    assert np.array_equal(np.asarray(shown), np.asarray(expected))


def test_restores_a_photo_and_shows_it_beside_the_original(page, server, tmp_path):
    photo = tmp_path / "holiday photo.jpg"
    photo.write_bytes(encode(_photo(), "JPEG"))
    _open(page, server)
    assert page.eval_on_selector_all("#task-select option", "options => options.map(o => o.value)") == \
        ["denoising", "deraining"]
    page.select_option("#task-select", "deraining")

    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_function("document.getElementById('result-image').complete")

    shown = page.eval_on_selector("#result-image", "img => [img.naturalWidth, img.naturalHeight]")
    original = page.eval_on_selector("#original-image", "img => [img.naturalWidth, img.naturalHeight]")
    assert shown == list(PHOTO_SIZE) and original == list(PHOTO_SIZE)
    assert page.get_attribute("#result-image", "alt") == "Restored (deraining): holiday photo.jpg"
    assert page.get_attribute("#original-image", "alt") == "Original: holiday photo.jpg"
    assert page.is_hidden("#error")

    # The breakdown is the result event's timings, one row per step plus the total.
    steps = page.eval_on_selector_all("#timings tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert {"Network (batched)", "Wait in the batching queue", "Decode and cut into tiles",
            "Stitch and encode PNG", "Total on the server"} <= set(steps)
    milliseconds = page.eval_on_selector_all("#timings tbody td:last-child", "cells => cells.map(c => c.textContent)")
    assert all(float(value) >= 0 for value in milliseconds)
    assert len(page.inner_text("#request-id")) >= 16

    # The download is the PNG a plain request for the same upload returns, carried here in base64.
    assert page.get_attribute("#download", "download") == "holiday photo-deraining.png"
    assert_same_pixels(_downloaded(page), _plain_restore(server, "deraining", photo.read_bytes()))

    # The comparison slider works from the keyboard.
    page.focus("#compare-slider")
    page.keyboard.press("End")
    assert page.eval_on_selector("#compare", "el => el.style.getPropertyValue('--split')") == "100%"
    for _ in range(35):
        page.keyboard.press("ArrowLeft")
    assert page.get_attribute("#compare-slider", "aria-valuetext") == "65% original, 35% restored"

    assert _screenshot(page, "web-result.png").stat().st_size > 10_000
    assert page.problems == []


def test_a_dropped_image_is_restored_and_can_be_shown_side_by_side(page, server):
    dropped = encode(_photo()[:48, :72], "PNG")
    _open(page, server)
    transfer = page.evaluate_handle("""bytes => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
        return transfer;
    }""", list(dropped))
    page.dispatch_event("#drop-zone", "dragenter", {"dataTransfer": transfer})
    assert "dragging" in page.get_attribute("#drop-zone", "class")
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_function("document.getElementById('result-image').complete")
    assert page.eval_on_selector("#result-image", "img => [img.naturalWidth, img.naturalHeight]") == [72, 48]
    assert "dragging" not in page.get_attribute("#drop-zone", "class")

    page.check("#view-side")
    assert "view-side" in page.get_attribute("#compare", "class")
    assert page.is_hidden("#compare-slider")
    boxes = [page.locator(selector).bounding_box() for selector in ("#original-image", "#result-image")]
    assert boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"], "the pictures overlap in side-by-side view"
    _screenshot(page, "web-side-by-side.png")
    assert page.problems == []


def test_an_upload_the_decoder_refuses_shows_the_apis_message_from_the_error_event(page, server):
    damaged = encode(_photo(), "PNG")[:300]  # a PNG's signature and header, then its data cut short
    expected = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("damaged.png", damaged)},
                          timeout=30).json()["error"]
    _open(page, server)
    with page.expect_response(re.compile(r"/v1/restore/denoising$")) as answered:
        page.set_input_files("#file-input", files=[{"name": "damaged.png", "mimeType": "image/png",
                                                    "buffer": damaged}])
    # Refused after the stream began: the HTTP status is 200, the API's error is in the last event.
    response = answered.value
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error-message") == expected["message"]
    assert page.inner_text("#error-code") == f"{expected['code']} \u00b7 HTTP 400"
    assert page.get_attribute("#error", "role") == "alert"
    assert page.is_hidden("#result") and page.is_hidden("#status")
    assert page.get_attribute("#result", "aria-busy") is None
    _screenshot(page, "web-error.png")
    assert page.problems == []


def test_an_upload_refused_before_the_stream_shows_the_apis_message(tiled_page, tiled_server):
    page, server = tiled_page, tiled_server
    oversize = encode(np.random.default_rng(5).integers(0, 256, (400, 400, 3), dtype=np.uint8))  # ~480 kB
    expected = httpx.post(f"{server.url}/v1/restore/denoising", files={"image": ("noise.png", oversize)},
                          timeout=30)
    assert expected.status_code == 413
    _open(page, server)
    page.set_input_files("#file-input", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": oversize}])
    page.wait_for_selector("#error:not([hidden])")
    # The API's message, but for the body's size: each multipart body has a boundary of its own.
    def sized(message: str) -> str:
        return re.sub(r"upload is \d+ bytes", "upload is N bytes", message)

    assert sized(page.inner_text("#error-message")) == sized(expected.json()["error"]["message"])
    assert page.inner_text("#error-code") == "payload_too_large \u00b7 HTTP 413"
    assert page.is_hidden("#result") and page.is_hidden("#status")
    # The browser logs the refused request itself; nothing else may go wrong.
    assert [problem for problem in page.problems if "413" not in problem] == []


# Every text the status line takes, in order, however quickly one replaces another.
RECORD_STATUS = """() => {
    window.statusTexts = [];
    new MutationObserver((records) => {
        for (const record of records) for (const node of record.addedNodes) window.statusTexts.push(node.textContent);
    }).observe(document.getElementById("status-text"), {childList: true});
}"""
TILES_SHOWN = "([done, total]) => {" \
    " const bar = document.getElementById('progress');" \
    " return bar.position !== -1 && bar.value === done && bar.max === total" \
    " && document.getElementById('status-text').textContent.includes(`${done} / ${total} tiles`); }"


WAITING_TEXT = r"^Restoring \(denoising\)\u2026 \d+\.\d s$"
# An indeterminate bar, and the status line shows seconds, other ones than `before`.
WAITING_SHOWN = "([pattern, before]) => {" \
    " const text = document.getElementById('status-text').textContent;" \
    " return document.getElementById('progress').position === -1 && new RegExp(pattern).test(text)" \
    " && text !== before; }"


def _tiles_in(texts: list[str]) -> list[int]:
    return [int(found.group(1)) for text in texts if (found := re.search(rf"(\d+) / {TILED_TILES} tiles", text))]


def test_the_bar_counts_tiles_while_the_service_works_then_the_result_appears(tiled_page, tiled_server,
                                                                               held_cutting, turnstile):
    page, server = tiled_page, tiled_server
    upload = encode(_photo(TILED_SIDE, TILED_SIDE), "PNG")
    _open(page, server)
    page.evaluate(RECORD_STATUS)
    page.set_input_files("#file-input", files=[{"name": "big.png", "mimeType": "image/png", "buffer": upload}])

    # Uploaded but not yet cut into tiles: nothing to count but the seconds, on an indeterminate bar.
    page.wait_for_function(WAITING_SHOWN, arg=[WAITING_TEXT, ""])
    page.wait_for_function(WAITING_SHOWN, arg=[WAITING_TEXT, page.inner_text("#status-text")])
    held_cutting.release.set()

    # Cut into tiles, the first held in the forward pass: a determinate bar at zero.
    page.wait_for_function(TILES_SHOWN, arg=[0, TILED_TILES])
    turnstile.let_through(5)
    page.wait_for_function(TILES_SHOWN, arg=[5, TILED_TILES])
    status = page.inner_text("#status-text")
    assert re.fullmatch(rf"Restoring \(denoising\)\u2026 5 / {TILED_TILES} tiles, "
                        r"(about \d+ (s|min)|less than a second) left", status), status
    assert page.is_hidden("#result") and page.get_attribute("#result", "aria-busy") == "true"
    assert page.is_visible("#cancel-button") and page.is_disabled("#restore-button")
    _screenshot(page, "web-progress.png")

    turnstile.open()
    page.wait_for_selector("#result:not([hidden])")
    texts = page.evaluate("window.statusTexts")
    done = _tiles_in(texts)
    assert done[0] == 0 and 5 in done and done[-1] == TILED_TILES and done == sorted(done), texts
    assert texts[-1].startswith("Restored big.png (200 \u00d7 200)"), texts
    assert page.is_hidden("#progress") and page.is_hidden("#cancel-button")
    assert page.get_attribute("#result", "aria-busy") is None
    assert_same_pixels(_downloaded(page), _plain_restore(server, "denoising", upload))
    assert page.problems == []


def test_cancel_stops_the_restore_on_the_server_and_the_page_can_restore_again(tiled_page, tiled_server,
                                                                                turnstile):
    page, server = tiled_page, tiled_server
    upload = encode(_photo(TILED_SIDE, TILED_SIDE), "PNG")
    cancelled_before = metric_value(server.metrics(), "mprnet_restores_cancelled_by_client_total")
    _open(page, server)
    page.set_input_files("#file-input", files=[{"name": "big.png", "mimeType": "image/png", "buffer": upload}])
    page.wait_for_function(TILES_SHOWN, arg=[0, TILED_TILES])

    page.get_by_role("button", name="Cancel").click()
    wait_until(lambda: metric_value(server.metrics(), "mprnet_restores_cancelled_by_client_total")
               == cancelled_before + 1, "the server to count the cancelled restore")
    assert page.inner_text("#status-text").startswith("Cancelled.")
    assert page.is_hidden("#cancel-button") and page.is_hidden("#progress") and page.is_hidden("#error")
    assert page.get_attribute("#result", "aria-busy") is None
    # The keyboard is left on the button that starts the next try.
    assert page.evaluate("document.activeElement.id") == "restore-button"

    turnstile.open()
    page.get_by_role("button", name="Restore").click()
    page.wait_for_selector("#result:not([hidden])")
    assert_same_pixels(_downloaded(page), _plain_restore(server, "denoising", upload))
    assert page.problems == []


def test_choosing_another_image_while_one_is_restored_cancels_the_first(tiled_page, tiled_server, turnstile):
    page, server = tiled_page, tiled_server
    cancelled_before = metric_value(server.metrics(), "mprnet_restores_cancelled_by_client_total")
    _open(page, server)
    first = encode(_photo(TILED_SIDE, TILED_SIDE), "PNG")
    page.set_input_files("#file-input", files=[{"name": "first.png", "mimeType": "image/png", "buffer": first}])
    page.wait_for_function(TILES_SHOWN, arg=[0, TILED_TILES])

    second = encode(_photo(72, 48), "PNG")
    page.set_input_files("#file-input", files=[{"name": "second.png", "mimeType": "image/png", "buffer": second}])
    wait_until(lambda: metric_value(server.metrics(), "mprnet_restores_cancelled_by_client_total")
               == cancelled_before + 1, "the server to count the abandoned restore")
    turnstile.open()
    page.wait_for_selector("#result:not([hidden])")
    assert page.get_attribute("#result-image", "alt") == "Restored (denoising): second.png"
    assert_same_pixels(_downloaded(page), _plain_restore(server, "denoising", second))
    assert page.problems == []


# Lines end in CRLF, LF or CR; a comment, a byte-order mark, fields without a space or a value,
# several data lines, an event without data and fields the page ignores.
STREAM_TEXT = ("\ufeff: restoring\r\n\r\nevent: progress\r\ndata: {\"done\": 0}\r\n\r\n: keep-alive\n\n"
               "event: result\ndata: line one\ndata:line two\ndata\n\nid: 7\nretry: 10\nevent: no data\n\n"
               "data: plain\r\r")
STREAM_EVENTS = [["progress", '{"done": 0}'], ["result", "line one\nline two\n"], ["message", "plain"]]


def test_the_event_stream_parser_reads_events_however_the_text_is_split(page, server):
    _open(page, server)
    outcome = page.evaluate("""async (text) => {
        const { EventStreamParser } = await import("/static/event-stream.js");
        const parse = (pieces) => {
            const events = [];
            const parser = new EventStreamParser((type, data) => events.push([type, data]));
            for (const piece of pieces) parser.push(piece);
            return events;
        };
        const whole = parse([text]);
        const differing = [];
        // Into three pieces at every pair of places, the empty piece included.
        for (let first = 0; first <= text.length; first += 1) {
            for (let second = first; second <= text.length; second += 1) {
                const pieces = [text.slice(0, first), text.slice(first, second), text.slice(second)];
                if (JSON.stringify(parse(pieces)) !== JSON.stringify(whole)) differing.push(pieces);
            }
        }
        return { whole, differing: differing.slice(0, 3), oneByOne: parse(Array.from(text)) };
    }""", STREAM_TEXT)
    assert outcome["whole"] == STREAM_EVENTS
    assert outcome["differing"] == []
    assert outcome["oneByOne"] == STREAM_EVENTS
    assert page.problems == []


def test_the_page_is_served_with_its_assets(server):
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, kind in (("/static/app.js", "javascript"), ("/static/event-stream.js", "javascript"),
                        ("/static/style.css", "text/css")):
        response = httpx.get(f"{server.url}{asset}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"], asset
    missing = httpx.get(f"{server.url}/static/missing.js", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # The page is for people; the API's schema stays the API's.
    assert "/" not in httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]



def test_the_docs_serve_the_swagger_ui_files_they_load_and_nothing_else_of_the_package(server):
    docs = httpx.get(f"{server.url}/docs", timeout=10)
    assert docs.status_code == 200
    for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "text/css"),
                        ("favicon-32x32.png", "image/png")):
        assert f"/swagger-ui/{asset}" in docs.text
        response = httpx.get(f"{server.url}/swagger-ui/{asset}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"], asset
    # The package's own demo page, which sends a browser to the public Petstore example.
    for other in ("index.html", "swagger-initializer.js", "..%2f..%2fweb.py"):
        refused = httpx.get(f"{server.url}/swagger-ui/{other}", timeout=10)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found", other
    assert not any(path.startswith("/swagger-ui") for path in httpx.get(f"{server.url}/openapi.json").json()["paths"])


def test_the_pages_script_and_styles_are_revalidated_like_the_page(server):
    # Cached by the browser's own guess, a redeployed page could run last week's app.js.
    for asset in ("/static/app.js", "/static/event-stream.js", "/static/style.css"):
        first = httpx.get(f"{server.url}{asset}", timeout=10)
        assert first.headers["cache-control"] == "no-cache", asset
        again = httpx.get(f"{server.url}{asset}", headers={"If-None-Match": first.headers["etag"]}, timeout=10)
        assert again.status_code == 304, asset  # revalidating an unchanged file costs no body


# Blob images (the original and the result) wait until the test sets window.releaseImages; each
# one held counts in window.heldImages.
HOLD_RESULT_IMAGES = """
window.heldImages = 0;
const source = Object.getOwnPropertyDescriptor(HTMLImageElement.prototype, "src");
Object.defineProperty(HTMLImageElement.prototype, "src", {
  get() { return source.get.call(this); },
  set(url) {
    if (!String(url).startsWith("blob:") || window.releaseImages) return source.set.call(this, url);
    window.heldImages += 1;
    const waiting = setInterval(() => {
      if (window.releaseImages) { clearInterval(waiting); source.set.call(this, url); }
    }, 20);
  },
});
"""


def test_a_result_still_decoding_when_another_image_is_chosen_never_covers_that_ones_answer(page, server):
    page.add_init_script(HOLD_RESULT_IMAGES)
    _open(page, server)
    page.set_input_files("#file-input", files=[{"name": "first.png", "mimeType": "image/png",
                                                "buffer": encode(_photo()[:40, :40], "PNG")}])
    page.wait_for_function("() => window.heldImages >= 2")  # the result event came; its images are decoding
    page.set_input_files("#file-input", files=[{"name": "second.gif", "mimeType": "image/gif",
                                                "buffer": encode(_photo()[:40, :40], "GIF")}])
    page.wait_for_selector("#error:not([hidden])")
    page.evaluate("window.releaseImages = true")
    page.wait_for_function("() => document.getElementById('result-image').complete "
                           "&& document.getElementById('original-image').complete")
    page.wait_for_timeout(300)  # for the first result's display to run on, as it once did
    assert "GIF" in page.inner_text("#error-message")
    assert page.is_hidden("#result") and not page.inner_text("#status-text").startswith("Restored")


def test_a_file_changed_since_it_was_chosen_is_named_and_can_be_chosen_again(page, server, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(_photo()[:40, :48], "PNG"))
    _open(page, server)
    page.set_input_files("#file-input", str(photo))
    page.wait_for_function("() => document.getElementById('status-text').textContent.startsWith('Restored')")
    assert page.eval_on_selector("#file-input", "input => input.value") == ""  # so that the same file is a change
    time.sleep(1.1)  # a later modification time
    photo.write_bytes(encode(_photo()[:40, :48] // 2, "PNG"))  # edited on disk: the browser sends nothing
    page.click("#restore-button")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error-code") == "file_unreadable"
    assert "photo.png can no longer be read" in page.inner_text("#error-message")
    page.set_input_files("#file-input", str(photo))
    page.wait_for_function("() => document.getElementById('status-text').textContent.startsWith('Restored')")
    assert page.is_hidden("#error")


def test_the_page_fits_a_320_pixel_screen_with_a_result(page, server):
    _open(page, server)
    page.set_input_files("#file-input", files=[{"name": "small.png", "mimeType": "image/png",
                                                "buffer": encode(_photo()[:40, :40], "PNG")}])
    page.wait_for_selector("#result:not([hidden])")
    page.set_viewport_size({"width": 320, "height": 900})
    assert page.evaluate("document.documentElement.scrollWidth") <= 320


def _contrast(first: str, second: str) -> float:
    def luminance(css: str) -> float:
        red, green, blue = (int(value) / 255 for value in re.findall(r"\d+", css)[:3])
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (red, green, blue)]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    lighter, darker = sorted((luminance(first), luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_focus_rings_stand_out_from_what_they_are_drawn_on(page, server):
    # WCAG 1.4.11: 3:1 for a focus indicator against the colours beside it.
    _open(page, server)
    page.emulate_media(color_scheme="light")
    page.evaluate("document.getElementById('cancel-button').hidden = false")
    page.focus("#cancel-button")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")  # focused by the keyboard, so :focus-visible applies
    ring, page_background = page.evaluate("""() => [
        getComputedStyle(document.getElementById('cancel-button')).outlineColor,
        getComputedStyle(document.body).backgroundColor]""")
    assert _contrast(ring, page_background) >= 3
    page.evaluate("document.getElementById('result').hidden = false")
    page.focus("#view-slider")  # the chosen option: its ring is drawn inside it, over the accent
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")
    ring, option_background = page.evaluate("""() => {
        const label = document.querySelector('label[for=view-slider]');
        return [getComputedStyle(label).outlineColor, getComputedStyle(label).backgroundColor]; }""")
    assert _contrast(ring, option_background) >= 3


@pytest.fixture(scope="module")
def keyed_server(tiny_weights):
    settings = Settings(tasks=("denoising",), device="cpu", backend="torch", tile_size=64, tile_overlap=8,
                        weights_denoising=tiny_weights(4), api_key_hashes=(hashlib.sha256(b"a-key").hexdigest(),))
    with running_server(settings) as running:
        yield running


def test_with_api_keys_on_the_page_says_it_cannot_send_one(browser, keyed_server):
    with _page_of(browser, keyed_server) as page:
        page.goto(f"{keyed_server.url}/")
        page.wait_for_function("() => document.getElementById('status-text').textContent.includes('API key')")
        assert page.is_hidden("#error")  # not "the image could not be restored": none was chosen
