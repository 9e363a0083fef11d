"""service.client against the real service on loopback (success, typed errors, a full queue,
folders, progress over an event stream, the CLI's remote mode), plus a scripted HTTP stub for the
retry rules and the stream's format themselves: dropped connections, Retry-After, give-up bounds,
foreign error pages and every way of splitting a stream are hard to provoke on demand from the
real service, and what is under test there is only the client's reaction."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    InvalidImage,
    NotFound,
    OutputTaken,
    Overloaded,
    PayloadTooLarge,
    Progress,
    ServiceError,
    Timeout,
    UnsupportedMediaType,
)
from service.client_retries import RetryPolicy
from service.config import Settings
from service.image_files import find_images, write_atomically
from service.tiling import plan_tiles

from service_helpers import (
    decode_png,
    encode,
    eventually,
    gated_forward,
    metric_value,
    random_image,
    running_server,
    tiny_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
TILE, OVERLAP = 32, 8
MAX_UPLOAD_BYTES = 64 * 1024
MAX_PIXELS = 128 * 128


def settings_for(weights: dict[str, Path], **overrides) -> Settings:
    # PyTorch: the client does not depend on the backend, and converting each tiny network to
    # OpenVINO afresh in every run took 40-54 s on a busy 2-core machine.
    values = dict(tasks=tuple(weights), device="cpu", backend="torch", tile_size=TILE, tile_overlap=OVERLAP,
                  max_batch_size=4, max_upload_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS,
                  **{f"weights_{task}": path for task, path in weights.items()})
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    return {"denoising": tiny_checkpoint(folder / "denoising.safetensors", 21),
            "deraining": tiny_checkpoint(folder / "deraining.safetensors", 22)}


@pytest.fixture(scope="module")
def server(weights):
    with running_server(settings_for(weights)) as running:
        yield running


def close_to(restored: np.ndarray, expected: np.ndarray) -> bool:
    # Batched and single forward passes may round differently in the last float bit.
    return restored.shape == expected.shape and int(np.abs(restored.astype(int) - expected).max()) <= 1


def requests_answered(server, code: str) -> float:
    return metric_value(server.metrics(), "mprnet_requests_total", code=code)


def tiles_of(height: int, width: int) -> int:
    return len(plan_tiles(height, width, TILE, OVERLAP))


def assert_counts_up_to_the_total(reports: list[Progress], total: int) -> None:
    done = [report.done for report in reports]
    assert done and done[0] == 0 and done[-1] == total, done
    assert done == sorted(set(done)), f"not increasing: {done}"
    assert {report.total for report in reports} == {total}


# -- against the real service -------------------------------------------------------------------

def test_restore_returns_the_png_its_request_id_and_the_server_timings(server, tmp_path):
    image = random_image(37, 45, seed=1)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(image, "JPEG"))
    with Client(server.url) as client:
        from_bytes = client.restore(encode(image), "denoising", request_id="my-trace-1")
        from_path = client.restore(photo, "deraining")
        assert client.ready() is True
        models = client.models()
    assert decode_png(from_bytes.png).size == (45, 37) and decode_png(from_path.png).size == (45, 37)
    assert from_bytes.request_id == "my-trace-1" and len(from_path.request_id) == 32
    assert {"decode", "queue", "inference", "encode", "total"} <= set(from_bytes.timings)
    assert all(value >= 0 for value in from_bytes.timings.values())
    assert from_bytes.timings["total"] >= from_bytes.timings["inference"]
    assert from_bytes.attempts == 1
    assert models["ready"] is True and set(models["models"]) == {"denoising", "deraining"}


def test_async_client_restores_concurrently(server):
    images = [random_image(24 + 8 * index, 40, seed=index) for index in range(3)]

    async def scenario():
        async with AsyncClient(server.url) as client:
            results = await asyncio.gather(*(client.restore(encode(image), "denoising") for image in images))
            return results, await client.ready(), await client.models()

    results, ready, models = asyncio.run(scenario())
    assert [np.asarray(decode_png(result.png)).shape for result in results] == [image.shape for image in images]
    assert len({result.request_id for result in results}) == 3
    assert ready and "denoising" in models["models"]


@pytest.mark.parametrize("image, task, error_type, status, code", [
    (b"plain text, not a picture", "denoising", InvalidImage, 400, "invalid_image"),
    (encode(random_image(8, 8, 2)), "colourising", NotFound, 404, "unknown_task"),
    (np.random.default_rng(0).bytes(MAX_UPLOAD_BYTES + 1), "denoising", PayloadTooLarge, 413, "payload_too_large"),
    (encode(np.zeros((200, 200, 3), np.uint8)), "denoising", PayloadTooLarge, 413, "image_too_large"),
    (encode(random_image(8, 8, 3), "GIF"), "denoising", UnsupportedMediaType, 415, "unsupported_media_type"),
], ids=["invalid-image", "unknown-task", "body-too-large", "too-many-pixels", "gif"])
def test_api_errors_arrive_typed_with_the_apis_code_and_message_and_are_not_retried(server, image, task, error_type,
                                                                                     status, code):
    # With progress, what is refused before the stream starts is an HTTP error as before, and
    # what fails once it has started (400, 415, the pixel limit) an error event.
    raised = []
    for progress in (None, lambda report: None):
        before = requests_answered(server, str(status))
        with Client(server.url, backoff=0.01) as client, pytest.raises(error_type) as caught:
            client.restore(image, task, progress=progress)
        error = caught.value
        assert isinstance(error, ServiceError)
        assert (error.status, error.code) == (status, code)
        assert error.message and error.message in str(error) and code in str(error)
        assert len(error.request_id) == 32
        assert requests_answered(server, str(status)) == before + 1, "a refused request was sent again"
        raised.append(error)
    plain, streamed = raised
    assert type(streamed) is type(plain) and (streamed.message, streamed.retry_after) == (plain.message, None)


def test_a_full_queue_answers_503_and_the_client_retries_until_it_gets_through(weights):
    # One queued tile fills the queue, and a batch of one waits 1.5 s for a partner before it runs:
    # a second request in that window is refused with Retry-After, and its retry is served.
    settings = settings_for({"denoising": weights["denoising"]}, max_queued_tiles=1, max_batch_size=2,
                            max_batch_wait_ms=1500)
    with running_server(settings) as server:
        async def scenario():
            async with AsyncClient(server.url, backoff=0.05) as client:
                first = asyncio.create_task(client.restore(encode(random_image(TILE, TILE, 4)), "denoising"))
                deadline = time.monotonic() + 20
                while metric_value(server.metrics(), "mprnet_queue_depth_tiles") < 1:
                    assert time.monotonic() < deadline and not first.done()
                    await asyncio.sleep(0.02)
                started = time.monotonic()
                second = await client.restore(encode(random_image(TILE, TILE, 5)), "denoising")
                return await first, second, time.monotonic() - started

        first, second, waited = asyncio.run(scenario())
        assert first.attempts == 1 and second.attempts >= 2
        assert decode_png(second.png).size == (TILE, TILE)
        assert waited >= 1.0, "the retry came before the service's Retry-After"
        assert metric_value(server.metrics(), "mprnet_requests_total", code="503") == second.attempts - 1


def test_restore_folder_into_the_input_folder_leaves_every_input_as_it_was(server, tmp_path):
    Image.fromarray(random_image(20, 20, 9)).save(tmp_path / "photo.png")
    Image.fromarray(random_image(20, 20, 10)).save(tmp_path / "scan.bmp")
    original = (tmp_path / "photo.png").read_bytes()
    with Client(server.url) as client:
        photo, scan = client.restore_folder([tmp_path], tmp_path, "denoising")
    assert isinstance(photo.error, OutputTaken) and "would overwrite the input" in str(photo.error)
    assert (tmp_path / "photo.png").read_bytes() == original
    assert scan.ok and (tmp_path / "scan.png").read_bytes() == scan.result.png


def test_restore_folder_takes_one_folder_given_as_a_string_as_that_folder(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(random_image(12, 12, 11)).save(tmp_path / "unrelated.png")  # in the working folder
    (tmp_path / "trip.2024").mkdir()
    Image.fromarray(random_image(12, 12, 12)).save(tmp_path / "trip.2024" / "holiday.png")
    with Client(server.url) as client:
        outcomes = client.restore_folder("trip.2024", "restored", "denoising")
    assert [(outcome.path, outcome.ok) for outcome in outcomes] == [(Path("trip.2024/holiday.png"), True)]
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["holiday.png"]


@pytest.mark.parametrize("output", ["parent", "root"])
def test_restore_folder_into_a_folder_above_the_inputs_restores_them(server, tmp_path, output):
    (tmp_path / "photos").mkdir()
    Image.fromarray(random_image(12, 12, 13)).save(tmp_path / "photos" / "beach.bmp")
    # Every file lies under the root folder too: none is a result of an earlier run.
    found, problems = find_images(tmp_path / "photos", leave_out="/" if output == "root" else tmp_path)
    assert (found, problems) == ([tmp_path / "photos" / "beach.bmp"], [])
    with Client(server.url) as client:
        [outcome] = client.restore_folder(tmp_path / "photos", tmp_path, "denoising")
    assert outcome.ok and (tmp_path / "beach.png").read_bytes() == outcome.result.png


def test_a_file_name_in_another_encoding_than_the_file_systems_is_restored(server, tmp_path):
    # A Latin-1 "café.png" from an old camera card on a UTF-8 system: bytes no multipart header
    # can carry as they are, which once ended the whole run with UnicodeEncodeError.
    name = os.fsdecode(b"caf\xe9.png")
    Image.fromarray(random_image(12, 12, 14)).save(tmp_path / name)
    Image.fromarray(random_image(12, 12, 15)).save(tmp_path / "plain.png")
    with Client(server.url) as client:
        outcomes = client.restore_folder(tmp_path, tmp_path / "out", "denoising")
    assert [(outcome.path.name, outcome.ok) for outcome in outcomes] == [(name, True), ("plain.png", True)]
    assert (tmp_path / "out" / name).read_bytes() == outcomes[0].result.png


def test_results_are_written_whole_or_not_at_all(tmp_path):
    # The temporary name must not grow with the target's: 250 bytes of stem plus ".png" fit the
    # 255-byte limit of a file name, and once did not with ".<name>.part" around them.
    long_name = tmp_path / f"{'x' * 250}.png"
    write_atomically(long_name, b"\x89PNG whole")
    assert long_name.read_bytes() == b"\x89PNG whole"
    mask = os.umask(0o022)
    os.umask(mask)
    assert long_name.stat().st_mode & 0o777 == 0o666 & ~mask  # as any file this user writes
    (tmp_path / "taken.png").mkdir()  # the final rename fails: a folder holds the name
    with pytest.raises(OSError):
        write_atomically(tmp_path / "taken.png", b"\x89PNG whole")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([long_name.name, "taken.png"])


def test_an_os_error_raised_by_the_progress_callback_stops_the_run(server, tmp_path):
    # A BrokenPipeError from printing progress to a closed pipe is the caller's, not a failure
    # to read or write the file; as the docstring says, it stops the run and propagates.
    for seed in (16, 17):
        Image.fromarray(random_image(12, 12, seed)).save(tmp_path / f"{seed}.png")

    def progress(path, report):
        raise BrokenPipeError("stdout is closed")

    with Client(server.url) as client, pytest.raises(BrokenPipeError):
        client.restore_folder(tmp_path, tmp_path / "out", "denoising", concurrency=1, on_progress=progress)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_restore_folder_writes_each_stem_and_reports_each_failure(server, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    images = {"a": random_image(30, 20, 6), "b": random_image(17, 33, 7), "c": random_image(8, 64, 8)}
    Image.fromarray(images["a"]).save(inputs / "a.png")
    Image.fromarray(images["b"]).save(inputs / "nested" / "b.bmp")
    Image.fromarray(images["c"]).save(inputs / "nested" / "c.tiff")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (inputs / "notes.txt").write_text("not an image suffix: ignored")
    clash = tmp_path / "a.jpg"  # its result would be out/a.png as well
    Image.fromarray(images["a"]).save(clash)
    out = tmp_path / "out"

    reported = []
    with Client(server.url) as client:
        outcomes = client.restore_folder([inputs, clash], out, "denoising", concurrency=2,
                                         on_outcome=reported.append)

    assert sorted(map(id, reported)) == sorted(map(id, outcomes)), "each outcome is reported exactly once"
    by_name = {outcome.path.name: outcome for outcome in outcomes}
    assert [outcome.path.name for outcome in outcomes] == ["a.png", "broken.png", "b.bmp", "c.tiff", "a.jpg"]
    assert [name for name, outcome in by_name.items() if outcome.ok] == ["a.png", "b.bmp", "c.tiff"]
    assert isinstance(by_name["broken.png"].error, InvalidImage)
    assert "already taken by" in str(by_name["a.jpg"].error)
    assert sorted(path.name for path in out.iterdir()) == ["a.png", "b.png", "c.png"], "partial files left behind"
    for stem, image in images.items():
        assert np.asarray(Image.open(out / f"{stem}.png")).shape == image.shape
    for name, stem in (("a.png", "a"), ("b.bmp", "b"), ("c.tiff", "c")):
        assert by_name[name].result.png == (out / f"{stem}.png").read_bytes()


# -- progress over an event stream ----------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_progress_counts_tiles_up_to_the_total_and_the_result_is_the_plain_restores(server, flavour):
    image = encode(random_image(100, 120, seed=14))
    reports: list[Progress] = []
    if flavour == "sync":
        with Client(server.url) as client:
            plain = client.restore(image, "denoising")
            streamed = client.restore(image, "denoising", request_id="streamed-1", progress=reports.append)
    else:
        async def scenario():
            async with AsyncClient(server.url) as client:
                return (await client.restore(image, "denoising"),
                        await client.restore(image, "denoising", request_id="streamed-1", progress=reports.append))

        plain, streamed = asyncio.run(scenario())
    assert_counts_up_to_the_total(reports, tiles_of(100, 120))
    assert streamed.png == plain.png
    assert (streamed.request_id, streamed.attempts) == ("streamed-1", 1)
    assert set(streamed.timings) == set(plain.timings) == {"decode", "queue", "inference", "encode", "total"}
    assert all(type(value) is float and value >= 0 for value in streamed.timings.values())


def test_restore_folder_reports_each_files_tile_progress(server, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(random_image(100, 120, 17)).save(inputs / "large.png")
    Image.fromarray(random_image(20, 20, 18)).save(inputs / "small.png")
    reports: dict[str, list[Progress]] = {}

    def report(path: Path, progress: Progress) -> None:
        reports.setdefault(path.name, []).append(progress)

    with Client(server.url) as client:
        outcomes = client.restore_folder([inputs], tmp_path / "out", "denoising", concurrency=2, on_progress=report)
    assert [outcome.ok for outcome in outcomes] == [True, True]
    assert sorted(reports) == ["large.png", "small.png"]
    assert_counts_up_to_the_total(reports["large.png"], tiles_of(100, 120))
    assert_counts_up_to_the_total(reports["small.png"], 1)


@pytest.fixture
def gated_server(weights):
    """A server whose forward passes wait for ``gate.release``, one tile per batch, a queue of
    five tiles, and keep-alives every 0.1 s of silence."""
    settings = settings_for({"denoising": weights["denoising"]}, max_batch_size=1, max_queued_tiles=5,
                            stream_keepalive_s=0.1)
    with running_server(settings) as running, gated_forward(running, "denoising") as gate:
        yield running, gate


def test_a_503_error_event_is_retried_as_a_503_answer_is(gated_server):
    server, gate = gated_server
    four_tiles = encode(random_image(56, 56, 15))
    assert tiles_of(56, 56) == 4

    async def metric(name: str, **labels: str) -> float:
        return metric_value(await asyncio.to_thread(server.metrics), name, **labels)

    async def three_queued() -> bool:
        return await metric("mprnet_queue_depth_tiles") == 3

    async def refused() -> bool:
        return await metric("mprnet_requests_total", code="503") == 1

    async def scenario():
        async with AsyncClient(server.url, backoff=0.05) as client:
            first = asyncio.create_task(client.restore(four_tiles, "denoising"))
            # One tile held in the forward pass, three queued: the queue has room for a request,
            # so the second is admitted and streams, but its four tiles do not fit beside them.
            await eventually(three_queued, "three queued tiles")
            reports: list[Progress] = []
            second = asyncio.create_task(client.restore(four_tiles, "denoising", progress=reports.append))
            await eventually(refused, "the second request's queue_full")
            gate.release.set()
            return await first, await second, reports

    first, second, reports = asyncio.run(scenario())
    assert first.attempts == 1 and second.attempts == 2
    assert [report.done for report in reports].count(0) == 2, "the first attempt was not a stream cut into tiles"
    assert_counts_up_to_the_total(reports[1:], 4)
    assert decode_png(second.png).size == (56, 56)


def test_a_restore_outlasts_the_clients_read_timeout_on_the_streams_keep_alives(gated_server):
    server, gate = gated_server
    image = encode(random_image(24, 24, 16))
    with Client(server.url, timeout=httpx.Timeout(1.0, connect=10.0), retries=0) as client:
        with pytest.raises(Timeout):  # the same wait without a stream: nothing arrives within the read timeout
            client.restore(image, "denoising")
        release = threading.Timer(3.0, gate.release.set)
        release.start()
        started = time.monotonic()
        result = client.restore(image, "denoising", progress=lambda report: None)
    assert time.monotonic() - started >= 2.5
    assert decode_png(result.png).size == (24, 24)


def test_the_async_client_takes_a_plain_function_as_progress_not_a_coroutine_function():
    async def report(progress: Progress) -> None:
        pass

    async def scenario():
        async with AsyncClient("http://127.0.0.1:9") as client:
            await client.restore(PNG, "denoising", progress=report)

    with pytest.raises(TypeError, match="plain function"):
        asyncio.run(scenario())


def test_the_client_library_and_the_cli_remote_mode_run_without_torch(server, tmp_path):
    # Each in a fresh interpreter (this one has imported everything), restoring for real, which
    # runs the paths where a lazy import would hide. Importing PyTorch takes seconds, which a
    # command that only sends files to a service should not pay (nor should --help).
    Image.fromarray(random_image(12, 12, 13)).save(tmp_path / "x.png")
    library = (f"from service.client import Client\nwith Client({server.url!r}) as client:\n"
               f"    assert client.restore_folder([{str(tmp_path)!r}], {str(tmp_path / 'out')!r}, 'denoising')[0].ok")
    command = (f"from service.cli import main\nassert main(['restore', {str(tmp_path / 'x.png')!r}, '-o', "
               f"{str(tmp_path / 'cli')!r}, '--task', 'denoising', '--url', {server.url!r}, '-q']) == 0")
    for script, never in ((library, {"service.cli", "torch", "fastapi"}), (command, {"torch"})):
        checked = f"import sys\n{script}\nprint(sorted({never!r} & set(sys.modules)))"
        run = subprocess.run([sys.executable, "-c", checked], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.strip() == "[]", (run.stdout, run.stderr)
    assert (tmp_path / "out" / "x.png").is_file() and (tmp_path / "cli" / "x.png").is_file()


# -- the CLI's remote mode ----------------------------------------------------------------------


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "restore", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return sorted(line for line in stderr.splitlines() if line.startswith("error: "))


def test_cli_remote_mode_matches_the_offline_command(server, weights, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    first = random_image(40, 56, 9)
    Image.fromarray(first).save(inputs / "first.png")
    Image.fromarray(random_image(33, 17, 10)).save(inputs / "nested" / "second.jpg")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    missing = tmp_path / "missing.png"

    remote = run_cli(inputs, missing, "-o", tmp_path / "remote", "--task", "denoising", "--url", server.url,
                     "--concurrency", "2")
    local = run_cli(inputs, missing, "-o", tmp_path / "local", "--task", "denoising", "--weights",
                    weights["denoising"], "--tile", TILE, "--overlap", OVERLAP, "--device", "cpu")

    assert remote.returncode == local.returncode == 1, remote.stderr
    assert error_lines(remote.stderr) == error_lines(local.stderr) and len(error_lines(remote.stderr)) == 2
    assert "Traceback" not in remote.stderr
    names = sorted(path.name for path in (tmp_path / "remote").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "local").iterdir()) == ["first.png", "second.png"]
    for name in names:
        assert close_to(np.asarray(Image.open(tmp_path / "remote" / name)),
                        np.asarray(Image.open(tmp_path / "local" / name)))

    single = run_cli(inputs / "first.png", "-o", tmp_path / "single", "--task", "denoising", "--url", server.url)
    assert single.returncode == 0, single.stderr
    assert single.stderr.strip().endswith(f"first.png -> {tmp_path / 'single' / 'first.png'}")


def test_cli_remote_mode_shows_a_bar_of_tiles_for_a_large_image_on_stderr_alone(server, tmp_path):
    Image.fromarray(random_image(100, 120, 19)).save(tmp_path / "large.png")
    Image.fromarray(random_image(20, 20, 20)).save(tmp_path / "small.png")
    shown = run_cli(tmp_path / "large.png", tmp_path / "small.png", "-o", tmp_path / "out", "--task", "denoising",
                    "--url", server.url)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == ""
    tile_bars = [line for line in shown.stderr.replace("\r", "\n").splitlines() if "tile" in line]
    assert tile_bars and all(line.startswith("large.png:") for line in tile_bars), tile_bars
    assert f"0/{tiles_of(100, 120)} [" in shown.stderr  # a single tile's image gets no bar of its own
    quiet = run_cli(tmp_path / "large.png", "-o", tmp_path / "quiet", "--task", "denoising", "--url", server.url,
                    "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == "", quiet.stderr


def test_cli_remote_mode_stops_early_for_a_service_it_cannot_use(weights, tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(random_image(16, 16, 11)).save(image)
    with running_server(settings_for({"denoising": weights["denoising"]})) as server:
        wrong_task = run_cli(image, "-o", tmp_path / "out", "--task", "deraining", "--url", server.url)
    assert wrong_task.returncode == 2
    assert error_lines(wrong_task.stderr) == [
        f"error: the service at {server.url} does not restore deraining; it serves denoising"]
    # The server is gone now: nothing listens on its port.
    unreachable = run_cli(image, "-o", tmp_path / "out", "--task", "denoising", "--url", server.url)
    assert unreachable.returncode == 2
    assert error_lines(unreachable.stderr)[0].startswith(f"error: cannot reach {server.url}")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- retry rules, against a scripted stub ---------------------------------------------------------

Reply = Callable[[BaseHTTPRequestHandler], None]
PNG = encode(random_image(4, 4, 12))


def reply(status: int, body: bytes | dict = b"", content_type: str = "application/json", **headers: str) -> Reply:
    payload = json.dumps(body).encode() if isinstance(body, dict) else body

    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.end_headers()
        handler.wfile.write(payload)
    return send


def hang_up(handler: BaseHTTPRequestHandler) -> None:
    handler.close_connection = True  # no status line at all: a crashed or restarting backend


def full_queue(retry_after: str) -> Reply:
    return reply(503, {"error": {"code": "queue_full", "message": "the inference queue is full"}},
                 Retry_After=retry_after)


def ok() -> Reply:
    return reply(200, PNG, "image/png", Server_Timing="inference;dur=2.5, total;dur=3", X_Request_ID="stub")


@contextmanager
def stub(*replies: Reply) -> Iterator[tuple[str, list[dict]]]:
    """A server answering each request with the next reply (the last one repeats); yields its URL
    and what it was sent (the time and X-Request-ID of each request)."""
    script = list(replies)
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append({"at": time.monotonic(), "request_id": self.headers.get("X-Request-ID"),
                         "accept": self.headers.get("Accept"), "api_key": self.headers.get("X-API-Key")})
            (script.pop(0) if len(script) > 1 else script[0])(self)

        do_GET = do_POST

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_retry_after_is_honoured_and_every_attempt_carries_the_same_request_id():
    with stub(full_queue("1"), ok()) as (url, seen), Client(url, backoff=0.01) as client:
        result = client.restore(PNG, "denoising")
    assert result.attempts == 2 and result.timings == {"inference": 2.5, "total": 3.0}
    assert seen[1]["at"] - seen[0]["at"] >= 1.0
    assert seen[0]["request_id"] == seen[1]["request_id"] and seen[0]["request_id"]


def test_retries_are_bounded_and_the_last_503_is_raised():
    with stub(full_queue("0")) as (url, seen), Client(url, retries=3, backoff=0.01) as client:
        with pytest.raises(Overloaded) as raised:
            client.restore(PNG, "denoising")
    assert len(seen) == 4
    assert (raised.value.status, raised.value.code, raised.value.retry_after) == (503, "queue_full", 0)


def test_a_retry_after_longer_than_the_client_will_wait_ends_the_retries_at_once():
    with stub(full_queue("Wed, 21 Oct 2099 07:28:00 GMT")) as (url, seen), Client(url, max_wait=30) as client:
        with pytest.raises(Overloaded) as raised:
            client.restore(PNG, "denoising")
    assert len(seen) == 1 and raised.value.retry_after > 30


def test_dropped_connections_are_retried_with_backoff():
    async def scenario(url):
        async with AsyncClient(url, backoff=0.2) as client:
            return await client.restore(PNG, "denoising")

    with stub(hang_up, hang_up, ok()) as (url, seen):
        result = asyncio.run(scenario(url))
    assert result.attempts == 3 and result.png == PNG
    # "Equal jitter": at least half of each step, 0.1 s then 0.2 s.
    assert seen[1]["at"] - seen[0]["at"] >= 0.1 and seen[2]["at"] - seen[1]["at"] >= 0.2


def test_an_unreachable_service_raises_connection_failed_after_the_retries():
    with stub(ok()) as (url, _):
        pass  # the port is free again
    with Client(url, retries=2, backoff=0.01) as client, pytest.raises(ConnectionFailed) as raised:
        client.restore(PNG, "denoising")
    assert raised.value.status is None and raised.value.code == "connection_failed"
    assert "after 3 attempts" in raised.value.message


def test_client_timeout_is_typed_and_not_retried():
    def slow(handler):
        time.sleep(1.0)
        try:
            ok()(handler)
        except OSError:
            pass  # the client has gone

    with stub(slow) as (url, seen), Client(url, timeout=0.3, backoff=0.01) as client:
        with pytest.raises(Timeout) as raised:
            client.restore(PNG, "denoising")
        assert len(seen) == 1
    assert raised.value.status is None and raised.value.code == "client_timeout"


def test_an_error_page_from_something_in_between_is_still_a_service_error():
    page = reply(502, b"<html><body>Bad Gateway</body></html>", "text/html")
    with stub(page) as (url, seen), Client(url, backoff=0.01) as client, pytest.raises(ServiceError) as raised:
        client.restore(PNG, "denoising")
    assert type(raised.value) is ServiceError and len(seen) == 1
    assert (raised.value.status, raised.value.code) == (502, "http_502")
    assert "Bad Gateway" in raised.value.message


# -- the event stream's format, against a scripted stub -------------------------------------------

def event_stream(text: str) -> Reply:
    """A 200 event stream of ``text``, a byte per write (so that lines and line breaks arrive
    split), ended by closing the connection."""
    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("X-Request-ID", "stub")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in text.encode():
            handler.wfile.write(bytes([byte]))
            time.sleep(0.0005)
        handler.close_connection = True
    return send


RESULT_EVENT = ("event: result\r\ndata: " + json.dumps({
    "png_base64": base64.b64encode(PNG).decode(), "width": 4, "height": 4, "request_id": "stub",
    "timings": {"inference": 2.5, "total": 3}}) + "\r\n\r\n")


def test_a_stream_is_read_whatever_its_chunks_line_breaks_comments_and_data_lines():
    stream = event_stream(
        ": restoring\r\n\r\n"
        'event: progress\r\ndata: {"done": 0, "total": 2}\r\n\r\n'
        ": keep-alive\r\n\r\n"
        'event: progress\r\ndata: {"done": 1,\r\ndata:  "total": 2, "eta_s": 0.5}\r\n\r\n'  # data on two lines
        'event: news-from-a-later-service\ndata: {}\n\n'
        'event: progress\ndata:{"done": 2, "total": 2}\n\n'
        + RESULT_EVENT)
    reports: list[Progress] = []
    with stub(stream) as (url, seen), Client(url) as client:
        result = client.restore(PNG, "denoising", progress=reports.append)
    with stub(ok()) as (url, plain_seen), Client(url) as client:
        client.restore(PNG, "denoising")
    assert reports == [Progress(0, 2), Progress(1, 2, 0.5), Progress(2, 2)]
    assert (result.png, result.request_id, result.timings, result.attempts) == (
        PNG, "stub", {"inference": 2.5, "total": 3.0}, 1)
    assert seen[0]["accept"] == "text/event-stream"
    assert plain_seen[0]["accept"] == "*/*", "a restore without progress asked for a stream"


def test_a_503_error_event_waits_its_retry_after_then_tries_again():
    refused = event_stream('event: progress\ndata: {"done": 0, "total": 2}\n\n'
                           'event: error\ndata: {"error": {"code": "queue_full", "message": "the queue is full", '
                           '"status": 503, "retry_after_s": 1}}\n\n')
    with stub(refused, event_stream(RESULT_EVENT)) as (url, seen), Client(url, backoff=0.01) as client:
        result = client.restore(PNG, "denoising", progress=lambda report: None)
    assert result.attempts == 2 and result.png == PNG
    assert seen[1]["at"] - seen[0]["at"] >= 1.0
    assert seen[0]["request_id"] == seen[1]["request_id"]
    with stub(refused) as (url, seen), Client(url, retries=1, backoff=0.01, max_wait=0.5) as client:
        with pytest.raises(Overloaded) as raised:
            client.restore(PNG, "denoising", progress=lambda report: None)
    assert len(seen) == 1, "retried although the service asked for a longer pause than max_wait"
    assert (raised.value.status, raised.value.code, raised.value.retry_after, raised.value.request_id) == (
        503, "queue_full", 1.0, "stub")


def test_a_stream_that_ends_before_its_result_is_a_dropped_connection():
    cut = event_stream('event: progress\ndata: {"done": 0, "total": 2}\n\nevent: result\ndata: {"png_ba')
    with stub(cut) as (url, seen), Client(url, retries=2, backoff=0.01) as client:
        with pytest.raises(ConnectionFailed) as raised:
            client.restore(PNG, "denoising", progress=lambda report: None)
    assert len(seen) == 3 and "ended before" in raised.value.message


def test_a_200_that_is_not_a_png_is_an_error_not_a_result():
    # A captive portal or a proxy's login page in front of the service.
    with stub(reply(200, b"<html>log in</html>", "text/html")) as (url, _), Client(url) as client:
        with pytest.raises(ServiceError) as raised:
            client.restore(PNG, "denoising")
    assert raised.value.code == "not_a_png" and "text/html" in raised.value.message


def test_a_result_event_that_is_not_a_png_is_the_same_error_as_a_plain_answers():
    html = ("event: result\ndata: " + json.dumps({"png_base64": base64.b64encode(b"<html>log in</html>").decode(),
                                                  "request_id": "stub", "timings": {}}) + "\n\n")
    with stub(event_stream(html)) as (url, _), Client(url) as client:
        with pytest.raises(ServiceError) as raised:
            client.restore(PNG, "denoising", progress=lambda report: None)
    assert raised.value.code == "not_a_png"


def test_no_pause_between_attempts_is_longer_than_max_wait():
    policy = RetryPolicy("http://stub", retries=10, backoff=4, max_wait=2)
    pauses = [policy.delay(attempt, retry_after) for attempt in range(1, 6) for retry_after in (None, 0.5, 2)
              for _ in range(50)]
    assert max(pauses) <= 2
    assert min(policy.delay(3, 2) for _ in range(50)) >= 2  # and never shorter than Retry-After


@pytest.mark.parametrize("url", ["", "localhost:8000", "http://[::1", "http://host:80:90", "ftp://host"])
def test_a_service_url_that_is_not_http_is_refused_at_once(url):
    with pytest.raises(ValueError, match="service URL"):
        Client(url)


def test_cli_usage_mistakes_exit_2_with_one_line(tmp_path):
    Image.fromarray(random_image(8, 8, 18)).save(tmp_path / "a.png")
    (tmp_path / "afile").write_text("not a folder")
    # An unset variable in a script: refused, not taken for "restore locally".
    empty = run_cli(tmp_path / "a.png", "-o", tmp_path / "out", "--task", "denoising", "--url", "")
    assert empty.returncode == 2 and error_lines(empty.stderr) == [
        "error: the service URL must be http://host:port or https://host:port, got ''"]
    assert not (tmp_path / "out").exists()
    for mode in ([], ["--url", "http://127.0.0.1:9"]):
        uncreatable = run_cli(tmp_path / "a.png", "-o", tmp_path / "afile" / "sub", "--task", "denoising", *mode)
        assert uncreatable.returncode == 2 and "Traceback" not in uncreatable.stderr, uncreatable.stderr
        assert error_lines(uncreatable.stderr) == [
            f"error: cannot create the output folder {tmp_path / 'afile' / 'sub'}: Not a directory"]


def test_a_retry_after_of_digits_that_are_not_ascii_is_ignored_not_a_crash():
    with stub(full_queue("²"), ok()) as (url, seen), Client(url, backoff=0.01) as client:
        assert client.restore(PNG, "denoising").attempts == 2


@pytest.mark.parametrize("key", ["the-key\n", " the-key "])
def test_an_api_key_read_with_surrounding_whitespace_is_sent_without_it(key):
    with stub(ok()) as (url, seen), Client(url, api_key=key) as client:
        client.restore(PNG, "denoising")
    assert seen[0]["api_key"] == "the-key"


@pytest.mark.parametrize("key", ["", "clé", "two\nlines"])
def test_an_api_key_no_header_can_carry_is_refused_without_being_shown(key):
    with pytest.raises(ValueError) as refused:
        Client("http://127.0.0.1:9", api_key=key)
    assert (key.strip() or "<nothing>") not in str(refused.value)
