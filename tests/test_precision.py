"""bf16 only where the device has it: on a CPU without bf16 instructions (AVX2 only, like this
project's VMs) bf16 is refused with a message naming what is missing and the override, and runs
(emulated, with a warning) only when the override is given; in the engine, `restore`, and `serve`.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models import MPRNet
from service.cli import EXIT_OK, EXIT_USAGE, main
from service.config import Settings
from service.engine import Engine, emulated_precision_problem

from service_helpers import TINY_ARCHITECTURE, encode, random_image, running_server, tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
            for flag in line.partition(":")[2].split()}


# Read here independently of the code under test: what the kernel says this CPU has.
CPU_HAS_BF16 = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16"})
needs_cpu_without_bf16 = pytest.mark.skipif(CPU_HAS_BF16, reason="this CPU runs bf16 natively; nothing to refuse")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("weights") / "denoising.safetensors", seed=9)


@pytest.fixture
def tiny_model() -> MPRNet:
    torch.manual_seed(0)
    return MPRNet(**TINY_ARCHITECTURE)


def test_fp32_needs_no_check_anywhere():
    assert emulated_precision_problem("fp32", "cpu") is None


@needs_cpu_without_bf16
def test_bf16_on_this_cpu_is_reported_as_emulated():
    problem = emulated_precision_problem("bf16", "cpu")
    assert problem is not None
    assert "avx512_bf16" in problem and "amx_bf16" in problem and "emulated" in problem


@needs_cpu_without_bf16
def test_the_engine_refuses_bf16_on_this_cpu_naming_the_missing_instructions_and_the_override(tiny_model):
    with pytest.raises(ValueError) as refused:
        Engine(tiny_model, device="cpu", precision="bf16", tile_size=32)
    message = str(refused.value)
    assert "bf16" in message and "avx512_bf16" in message and "amx_bf16" in message
    assert "--allow-emulated-precision" in message and "MPRNET_ALLOW_EMULATED_PRECISION" in message


@needs_cpu_without_bf16
def test_the_engine_runs_emulated_bf16_when_allowed_and_says_so(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="service.engine"):
        engine = Engine(tiny_model, device="cpu", precision="bf16", tile_size=32, allow_emulated_precision=True)
    assert any("emulated" in record.getMessage() for record in caplog.records), caplog.text
    tiles = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    restored = engine.forward(tiles)
    assert restored.shape == tiles.shape and restored.dtype == np.float32


def test_fp16_on_the_cpu_stays_refused_even_with_the_override(tiny_model):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Engine(tiny_model, device="cpu", precision="fp16", allow_emulated_precision=True)


@needs_cpu_without_bf16
def test_restore_command_reports_bf16_on_this_cpu_as_a_usage_error(weights, tmp_path, capsys):
    image = tmp_path / "in.png"
    image.write_bytes(encode(random_image(24, 24, seed=1)))
    common = ["restore", str(image), "-o", str(tmp_path / "out"), "--task", "denoising", "--weights", str(weights),
              "--device", "cpu", "--tile", "32", "--overlap", "8", "--precision", "bf16", "-q"]
    assert main(common) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "avx512_bf16" in error and "--allow-emulated-precision" in error
    assert not (tmp_path / "out" / "in.png").exists()

    assert main([*common, "--allow-emulated-precision"]) == EXIT_OK
    assert (tmp_path / "out" / "in.png").is_file()


@needs_cpu_without_bf16
def test_serve_exits_2_before_binding_when_bf16_would_be_emulated(weights):
    # A port that is never bound: the check comes first, so nothing listens on it.
    command = [sys.executable, "-m", "service", "serve", "--tasks", "denoising", "--weights-denoising", str(weights),
               "--device", "cpu", "--precision", "bf16", "--port", "0"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == EXIT_USAGE, finished.stderr[-2000:]
    assert "avx512_bf16" in finished.stderr and "--allow-emulated-precision" in finished.stderr
    assert "Uvicorn running" not in finished.stderr


@needs_cpu_without_bf16
def test_the_service_serves_emulated_bf16_when_allowed(weights):
    settings = Settings(tasks="denoising", weights_denoising=weights, device="cpu", precision="bf16",
                        allow_emulated_precision=True, tile_size=32, tile_overlap=8, max_batch_size=2,
                        log_level="warning")
    with running_server(settings) as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
        assert models["models"]["denoising"]["precision"] == "bf16"
        response = httpx.post(f"{server.url}/v1/restore/denoising",
                              files={"image": ("a.png", encode(random_image(24, 24, seed=2)))}, timeout=60)
        assert response.status_code == 200, response.text
