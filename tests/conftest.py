"""Fixtures shared by the test files; what they build is defined once, in service_helpers.py."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from service.config import Settings

from service_helpers import ROOT, RunningServer, running_server, tiny_checkpoint

SHARED = ROOT.parent / "shared"


def pytest_configure(config) -> None:
    # Converted models (OpenVINO) go to a folder of this run, not the user's cache; child
    # processes the tests start inherit it.
    if "MPRNET_MODEL_CACHE_DIR" not in os.environ:
        os.environ["MPRNET_MODEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="mprnet-test-cache-")
CONFORMANCE = SHARED / "conformance"
KODAK = SHARED / "datasets" / "eval" / "Kodak24"


@pytest.fixture
def install_dir(tmp_path, monkeypatch) -> Path:
    """Where ``python -m service weights install`` puts files in this test: a fresh folder."""
    target = tmp_path / "installed"
    monkeypatch.setenv("MPRNET_WEIGHTS_DIR", str(target))
    return target


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip("../shared/conformance is not beside the checkout")
    return CONFORMANCE


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Callable[[int], Path]:
    """``tiny_weights(seed)``: the path of a tiny random MPRNet checkpoint (TINY_ARCHITECTURE),
    written once per seed for the whole session. Different seeds give different networks, so
    two tasks given different seeds restore differently."""
    folder = tmp_path_factory.mktemp("tiny-weights")
    made: dict[int, Path] = {}

    def weights(seed: int = 0) -> Path:
        if seed not in made:
            made[seed] = tiny_checkpoint(folder / f"tiny-{seed}.safetensors", seed)
        return made[seed]

    return weights


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """``start_server(settings, wait_ready=True, side_door=False)``: the app under uvicorn on
    loopback (see ``service_helpers.running_server``), stopped when the test ends. For a server
    shared by a module, use ``running_server`` in a module-scoped fixture."""
    with ExitStack() as servers:
        def start(settings: Settings, **options) -> RunningServer:
            return servers.enter_context(running_server(settings, **options))

        yield start
