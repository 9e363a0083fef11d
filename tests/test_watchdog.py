"""The worker watchdog through the real server: a forward pass that hangs turns /readyz to 503
with the reason, and the metric says which worker, until the pass returns. The hang is real: the
tiny MPRNet's forward blocks on an event the test holds, in the inference thread itself.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from service.config import Settings

from service_helpers import encode, metric_value, random_image, running_server, tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

STALL_AFTER_S = 1.0


class StallingNetwork(torch.nn.Module):
    """A real network whose forward waits, in the calling thread, until the test releases it."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.entered = threading.Event()
        self.released = threading.Event()

    def forward(self, batch: torch.Tensor):
        self.entered.set()
        # Bounded, so that a failing test cannot leave a thread the interpreter waits for at exit.
        if not self.released.wait(timeout=120):
            raise RuntimeError("the test never released the forward pass")
        return self.network(batch)


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("weights") / "denoising.safetensors", seed=4)


def test_a_hung_forward_pass_turns_readiness_off_with_the_reason_until_it_returns(weights, caplog):
    settings = Settings(tasks="denoising", weights_denoising=weights, device="cpu", tile_size=32, tile_overlap=8,
                        max_batch_size=4, request_timeout_s=60, worker_stall_timeout_s=STALL_AFTER_S,
                        log_level="warning", backend="torch")  # the hang is put into PyTorch's model
    with running_server(settings) as server:
        engine = server.service.workers["cpu"]["denoising"]
        stalling = StallingNetwork(engine.model)
        engine.model = stalling  # the engine's plain path runs self.model (no compile, no graphs here)
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200

        answers: list[httpx.Response] = []
        upload = encode(random_image(24, 24, seed=3))
        client = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{server.url}/v1/restore/denoising", files={"image": ("a.png", upload)}, timeout=90)))
        try:
            with caplog.at_level(logging.WARNING, logger="service.batching"):
                client.start()
                assert stalling.entered.wait(timeout=30), "the request never reached the forward pass"
                not_ready = wait_for(lambda: (r := httpx.get(f"{server.url}/readyz", timeout=10)).status_code == 503
                                     and r, timeout_s=STALL_AFTER_S + 10, what="/readyz to turn 503")
                message = not_ready.json()["error"]["message"]
                assert "stalled" in message and "cpu" in message and "worker_stall_timeout_s" in message, message
                metrics = server.metrics()
                assert metric_value(metrics, "mprnet_worker_stalled", device="cpu") == 1
                assert metric_value(metrics, "mprnet_ready") == 0
                assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200  # alive, not ready
                assert any("readiness is off" in r.getMessage() for r in caplog.records), caplog.text
        finally:
            stalling.released.set()
            client.join(timeout=60)

        assert answers and answers[0].status_code == 200, answers and answers[0].text
        wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200, timeout_s=10,
                 what="/readyz to come back")
        assert metric_value(server.metrics(), "mprnet_worker_stalled", device="cpu") == 0
        assert any("readiness is back" in r.getMessage() for r in caplog.records), caplog.text
