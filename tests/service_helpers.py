"""Helpers for tests that run the real service: tiny checkpoints, a uvicorn server on loopback,
images as upload bytes, and the Prometheus text parsed."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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

TINY_ARCHITECTURE = dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, reduction=2)


def tiny_checkpoint(path: Path, seed: int) -> Path:
    """A real, randomly initialised MPRNet small enough to run many requests in a test."""
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


@dataclass
class RunningServer:
    url: str
    app: FastAPI
    server: uvicorn.Server

    @property
    def service(self):
        return self.app.state.service

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/readyz", timeout=10).status_code != 200:
            assert self.service.load_error is None, self.service.load_error
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.02)


@contextmanager
def running_server(settings: Settings, wait_ready: bool = True) -> Iterator[RunningServer]:
    """The app under a real uvicorn server on a free loopback port, in a background thread."""
    app = create_app(settings)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    running = RunningServer(url=f"http://127.0.0.1:{port}", app=app, server=server)
    try:
        if wait_ready:
            running.wait_ready()
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def multipart_body(field: str, filename: str, data: bytes, content_type: str = "application/octet-stream",
                   boundary: str = "mprnet-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body by hand, for raw-socket and chunked uploads."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
