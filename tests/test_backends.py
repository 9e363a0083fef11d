"""The service on each backend: OpenVINO on the CPU behaves as PyTorch does, through the whole
path (tiling, batching across requests, metrics, cancellation, deadlines, several workers)."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from service.backends import resolve_backend
from service.config import Settings
from service.openvino_runner import openvino_available

from service_helpers import decode_png, encode, metric_samples, metric_value, random_image, wait_until

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(openvino_available() is not None, reason=f"OpenVINO: {openvino_available()}")]

TILE, OVERLAP = 64, 8


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def _settings(weights, backend: str, **overrides) -> Settings:
    values = dict(tasks="denoising,deraining", weights_denoising=weights(21), weights_deraining=weights(22),
                  device="cpu", backend=backend, tile_size=TILE, tile_overlap=OVERLAP, max_batch_size=2,
                  max_batch_wait_ms=20)
    values.update(overrides)
    return Settings(**values)


def _restore(url: str, task: str, image: np.ndarray) -> np.ndarray:
    response = httpx.post(f"{url}/v1/restore/{task}", files={"image": ("a.png", encode(image))}, timeout=120)
    assert response.status_code == 200, response.text
    return np.asarray(decode_png(response.content))


def test_auto_is_openvino_on_the_cpu_and_torch_elsewhere():
    import torch

    assert resolve_backend("auto", torch.device("cpu"), "fp32") == ("openvino", None)
    assert resolve_backend("auto", torch.device("cpu"), "bf16")[0] == "torch"
    assert resolve_backend("torch", torch.device("cpu"), "fp32") == ("torch", None)
    assert resolve_backend("auto", torch.device("cuda"), "fp32")[0] == "torch"
    with pytest.raises(ValueError, match="CPU"):
        resolve_backend("openvino", torch.device("cuda"), "fp32")


def test_both_backends_restore_alike_through_the_whole_service(tiny_weights, start_server):
    images = [random_image(150, 170, seed=1), random_image(40, 56, seed=2), random_image(8, 8, seed=3)]
    served = {}
    for backend in ("torch", "openvino"):
        server = start_server(_settings(tiny_weights, backend))
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]
        assert {card["backend"] for card in models.values()} == {backend}
        metrics = server.metrics()
        assert {s.labels["backend"] for s in metric_samples(metrics)["mprnet_model_info"]} == {backend}
        served[backend] = [_restore(server.url, task, image) for task in ("denoising", "deraining")
                           for image in images]
    for torch_image, openvino_image in zip(served["torch"], served["openvino"]):
        assert torch_image.shape == openvino_image.shape
        assert _psnr(torch_image, openvino_image) >= 50


def test_openvino_batches_across_requests_and_drops_the_work_of_clients_that_left(tiny_weights, start_server):
    server = start_server(_settings(tiny_weights, "openvino", max_batch_wait_ms=10_000, max_batch_size=4))
    url = f"{server.url}/v1/restore/denoising"
    # Four single-tile requests fill one batch of four, which waits for nothing else.
    results = [None] * 4

    def post(index: int) -> None:
        results[index] = httpx.post(url, files={"image": ("a.png", encode(random_image(48, 48, seed=index)))},
                                    timeout=120).status_code

    clients = [threading.Thread(target=post, args=(index,)) for index in range(4)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(120)
    assert results == [200] * 4
    metrics = server.metrics()
    assert metric_value(metrics, "mprnet_batch_size_count", task="denoising") == 1
    assert metric_value(metrics, "mprnet_batch_size_sum", task="denoising") == 4
    # A client that leaves before its batch fills: its tiles leave the queue.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, files={"image": ("a.png", encode(random_image(48, 48, seed=9)))},
                   timeout=httpx.Timeout(30, read=1.0))
    wait_until(lambda: metric_value(server.metrics(), "mprnet_queue_depth_tiles", task="denoising") == 0,
               "the queue to drop the tiles of the client that left")


def test_openvino_requests_past_their_deadline_get_504(tiny_weights, start_server):
    server = start_server(_settings(tiny_weights, "openvino", request_timeout_s=1.0,
                                    max_batch_wait_ms=10_000, max_batch_size=4))
    response = httpx.post(f"{server.url}/v1/restore/denoising",
                          files={"image": ("a.png", encode(random_image(48, 48, seed=4)))}, timeout=60)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"


def test_openvino_runs_one_worker_per_listed_cpu(tiny_weights, start_server):
    server = start_server(_settings(tiny_weights, "openvino", devices="cpu,cpu"))
    image = random_image(200, 200, seed=5)
    restored = _restore(server.url, "denoising", image)
    assert restored.shape == image.shape
    workers = httpx.get(f"{server.url}/v1/models", timeout=10).json()["workers"]
    assert workers == ["cpu#0", "cpu#1"]
