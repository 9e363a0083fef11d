"""One definition of what tests and benchmarks need to run the real service: the tiny network and
its checkpoints, the service in-process under uvicorn or as a `python -m service serve` process,
images as upload bytes, the Prometheus text parsed, and a bounded wait.

Tests reach these through the fixtures in ``tests/conftest.py`` or by importing this module
(pytest puts ``tests/`` on the path); ``bench/`` imports it as ``tests.service_helpers``, run from
the repository root as ``python -m bench.<name>``.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models import MPRNet, save_safetensors
from service.app import create_app
from service.config import Settings
from service.server import uvicorn_config

__all__ = ["ROOT", "TINY_ARCHITECTURE", "tiny_checkpoint", "random_image", "encode", "decode_png", "metric_samples",
           "metric_value", "multipart_body", "wait_until", "eventually", "free_port", "RunningServer", "running_server",
           "ForwardGate", "gated_forward", "ServingProcess", "serving_process"]

ROOT = Path(__file__).resolve().parents[1]

# A real MPRNet, small enough that a test can send it many requests on a CPU.
TINY_ARCHITECTURE = dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, reduction=2)

T = TypeVar("T")


def tiny_checkpoint(path: Path, seed: int) -> Path:
    """A real, randomly initialised MPRNet of ``TINY_ARCHITECTURE``, saved as safetensors."""
    torch.manual_seed(seed)
    save_safetensors(MPRNet(**TINY_ARCHITECTURE), path)
    return path


def random_image(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(pixels: np.ndarray, image_format: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=image_format)
    return buffer.getvalue()


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def metric_samples(text: str) -> dict[str, list]:
    """Sample name -> samples (each with ``.labels`` and ``.value``)."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(sample.value for sample in metric_samples(text).get(name, [])
               if all(sample.labels.get(key) == value for key, value in labels.items()))


def multipart_body(field: str, filename: str, data: bytes, content_type: str = "application/octet-stream",
                   boundary: str = "mprnet-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body by hand, for raw-socket and chunked uploads."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def wait_until(check: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.02) -> T:
    """Poll ``check`` until it returns something true, and return that. The timeout only turns a
    hang into a failure naming ``what``; it is no claim about how fast anything should be."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"gave up after {timeout:g} s waiting for {what}"
        time.sleep(interval)
    return result


async def eventually(check: Callable[[], Awaitable[T]], what: str, timeout: float = 60.0, interval: float = 0.02) -> T:
    """``wait_until`` inside an event loop, for a coroutine function ``check``."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, f"gave up after {timeout:g} s waiting for {what}"
        await asyncio.sleep(interval)
    return result


async def until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """``eventually`` for a plain function ``condition``, polled every 5 ms on the event loop."""
    async def check() -> object:
        return condition()

    await eventually(check, "a condition", timeout, interval=0.005)


async def finished(awaitable: Awaitable[T], what: str, timeout: float = 30.0) -> T:
    """The result of ``awaitable``; the timeout is a guard far above any wait these tests allow for."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise AssertionError(f"{what} did not finish within {timeout:g} s") from None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    return listener


# -- the app in this process ----------------------------------------------------------------------

@dataclass
class RunningServer:
    url: str
    app: FastAPI
    server: uvicorn.Server
    side_url: str | None = None

    @property
    def service(self):
        return self.app.state.service

    def metrics(self, url: str | None = None) -> str:
        return httpx.get(f"{url or self.url}/metrics", timeout=10).text

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            response = httpx.get(f"{self.url}/readyz", timeout=10)
            assert "failed to load" not in response.text, response.text
            return response.status_code == 200

        wait_until(ready, "the service to become ready", timeout)

    def begin_shutdown(self) -> None:
        """What uvicorn does on SIGTERM: stop listening, let connections finish, then run the
        app's lifespan shutdown (the drain). Returns at once."""
        self.server.should_exit = True


@contextmanager
def running_server(settings: Settings, wait_ready: bool = True, side_door: bool = False,
                   root_path: str = "") -> Iterator[RunningServer]:
    """The app under a real uvicorn server on a free loopback port, in a background thread.

    ``root_path``: served as ``uvicorn --root-path`` serves it, behind a proxy that strips a prefix.

    ``side_door``: a second uvicorn server on the same app and event loop, on its own port
    (``side_url``), without a lifespan of its own, which stays open when the main one shuts down.
    uvicorn closes its listener before it runs the app's lifespan shutdown, so what the app
    answers while it drains can only be asked through a listener that is still open.
    """
    app = create_app(settings)
    listeners = [_listener()]
    # Configured as `serve` configures it (the slow-client cut included), with a shorter drain.
    served_as = settings.model_copy(update={"graceful_shutdown_s": min(settings.graceful_shutdown_s, 5)})
    config = uvicorn_config(served_as, app)
    config.root_path = root_path
    servers = [uvicorn.Server(config)]
    if side_door:
        listeners.append(_listener())
        servers.append(uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                     timeout_graceful_shutdown=5)))

    async def serve_together() -> None:
        # One event loop for both: the batching queue's futures belong to the loop it started on.
        await asyncio.gather(*(server.serve(sockets=[listener]) for server, listener in zip(servers, listeners)))

    def serve_all() -> None:
        # The loop uvicorn would choose itself (uvloop where installed), as `serve` gets.
        loop = (servers[0].config.get_loop_factory() or asyncio.new_event_loop)()
        try:
            loop.run_until_complete(serve_together())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    thread = threading.Thread(target=serve_all, daemon=True)
    thread.start()
    wait_until(lambda: all(server.started for server in servers) or not thread.is_alive(), "uvicorn to start", 30)
    assert thread.is_alive(), "uvicorn did not start"
    urls = [f"http://127.0.0.1:{listener.getsockname()[1]}" for listener in listeners]
    running = RunningServer(url=urls[0], app=app, server=servers[0], side_url=urls[1] if side_door else None)
    try:
        if wait_ready:
            running.wait_ready()
        yield running
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(timeout=30)
        for listener in listeners:
            listener.close()


class ForwardGate:
    """Stands in for a worker's forward pass and holds each call until the test sets ``release``."""

    def __init__(self, forward: Callable):
        self.forward = forward
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, tiles):
        self.entered.set()
        assert self.release.wait(60), "the test never released the forward pass"
        return self.forward(tiles)


@contextmanager
def gated_forward(server: RunningServer, task: str) -> Iterator[ForwardGate]:
    """Hold every forward pass of ``task`` on ``server``'s first worker at a :class:`ForwardGate`;
    released on the way out."""
    worker = server.service.batcher._workers[0]
    gate = ForwardGate(worker.forward_by_task[task])
    worker.forward_by_task[task] = gate
    try:
        yield gate
    finally:
        gate.release.set()


# -- `python -m service serve` in a child process ---------------------------------------------------

@dataclass
class ServingProcess:
    process: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)  # its stderr, as read so far
    reader: threading.Thread | None = None

    def log(self) -> str:
        return "".join(self.lines)

    def finished_log(self, timeout: float = 30.0) -> str:
        """All of stderr, once the process has exited and the reader has read to its end."""
        self.process.wait(timeout=timeout)
        if self.reader is not None:
            self.reader.join(timeout=timeout)
            assert not self.reader.is_alive(), "stderr was never closed"
        return self.log()

    def wait_ready(self, timeout: float = 120.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"the server exited ({self.process.returncode}):\n{self.log()}"
            try:
                return httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200
            except httpx.TransportError:
                return False  # not listening yet

        wait_until(ready, "the server to become ready", timeout, interval=0.05)


@contextmanager
def serving_process(settings: Mapping[str, str], wait_ready: bool = True, port: int | None = None,
                    cwd: Path = ROOT, python: str = sys.executable) -> Iterator[ServingProcess]:
    """``python -m service serve`` on 127.0.0.1 with ``MPRNET_*`` ``settings`` (and no others from
    this environment), its stderr collected; terminated (SIGTERM, then SIGKILL) on the way out.

    The port is chosen here rather than with ``--port 0``, so the URL is known whatever the log level.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("MPRNET_")}
    env.update(settings, PYTHONUNBUFFERED="1")
    port = port or free_port()
    process = subprocess.Popen([python, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    served = ServingProcess(process=process, url=f"http://127.0.0.1:{port}")
    served.reader = threading.Thread(target=lambda: served.lines.extend(process.stderr), daemon=True)
    served.reader.start()
    try:
        if wait_ready:
            served.wait_ready()
        yield served
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

