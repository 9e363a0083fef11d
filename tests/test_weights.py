"""Bundled weights and the released-weights installer, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from models import RELEASED_CONFIGS, MPRNet, load_checkpoint, load_model, save_safetensors, sha256_file, weights
from models.weights import TASKS, WeightsInstallError, WeightsNotFound

PAGE_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"     # served behind a confirmation page
PRIVATE_ID = "1PrivateFileThatDriveWillNotServe0"   # only ever answered with a page


# --------------------------------------------------------------------------------------------
# Fixtures: checkpoints and a server that imitates Google Drive
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def released_deraining(tmp_path_factory) -> Path:
    """A random-weight checkpoint in the released files' layout and the deraining configuration."""
    torch.manual_seed(0)
    model = MPRNet(**RELEASED_CONFIGS["deraining"].as_kwargs())
    path = tmp_path_factory.mktemp("ckpt") / "model_deraining.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def tiny_mprnet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_safetensors(MPRNet(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1), path)
    return path


@pytest.fixture(scope="module")
def not_mprnet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "other.pth"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, path)
    return path


class FakeDrive(http.server.BaseHTTPRequestHandler):
    """``/files/NAME`` serves a file; ``/uc`` and ``/download`` behave like Drive for a large file:
    a "can't scan for viruses" page whose form carries ``confirm`` and ``uuid``."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _page(self, file_id: str) -> None:
        base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        html = f"""<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
            <p>Google Drive can't scan this file for viruses.</p>
            <form id="download-form" action="{base}/download" method="get">
              <input type="submit" id="uc-download-link" value="Download anyway"/>
              <input type="hidden" name="id" value="{file_id}">
              <input type="hidden" name="export" value="download">
              <input type="hidden" name="confirm" value="t">
              <input type="hidden" name="uuid" value="0f1e2d3c">
            </form></body></html>"""
        self._send(html.encode(), "text/html; charset=utf-8")

    def do_GET(self):
        type(self).requests.append(self.path)
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/files/"):
            name = url.path.removeprefix("/files/")
            if name not in self.files:
                self.send_error(404)
                return
            self._send(self.files[name], "application/octet-stream")
        elif url.path == "/uc":
            self._page(query.get("id", ""))
        elif url.path == "/download":
            file_id = query.get("id", "")
            if file_id in self.files and query.get("confirm") == "t" and query.get("uuid") == "0f1e2d3c":
                self._send(self.files[file_id], "application/octet-stream")
            else:
                self._page(file_id)
        else:
            self.send_error(404)


@pytest.fixture
def drive(monkeypatch, released_deraining, tiny_mprnet, not_mprnet):
    FakeDrive.files = {"deraining.pth": released_deraining.read_bytes(), "tiny.safetensors": tiny_mprnet.read_bytes(),
                       "other.pth": not_mprnet.read_bytes(), "garbage.bin": b"\x00not a checkpoint" * 100,
                       PAGE_ID: released_deraining.read_bytes()}
    FakeDrive.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeDrive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    # Point the installer's Drive endpoints at the imitation; the code path is the real one.
    monkeypatch.setattr(weights, "DRIVE_URL", f"{base}/uc")
    monkeypatch.setattr(weights, "DRIVE_USERCONTENT_URL", f"{base}/download")
    yield base
    server.shutdown()
    server.server_close()


def _leftovers(folder: Path) -> list[str]:
    # The installer's manifest.json is checked in test_installer.py; here, weights and partials.
    return sorted(p.name for p in folder.iterdir() if p.name != "manifest.json") if folder.exists() else []


# --------------------------------------------------------------------------------------------
# Bundled weights
# --------------------------------------------------------------------------------------------

def test_bundled_weights_match_manifest():
    listed = weights.manifest()
    assert sorted(listed) == sorted(TASKS)
    for task in TASKS:
        entry, path = listed[task], weights.bundled_path(task)
        assert path.name == entry["file"] and path.is_file()
        assert sha256_file(path) == entry["sha256"]
        assert load_checkpoint(path).config.as_kwargs() == entry["config"]


def test_model_card_lists_the_bundled_files():
    from training.bundle import files_table
    from training.card import section
    assert section("files") == files_table(weights.manifest())


def _smooth_photo(height: int = 96, width: int = 128):
    """Smooth colour gradients and a dark block with sharp edges: nothing a network should change."""
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = np.stack([0.5 + 0.4 * np.sin(6 * xx + 2 * yy), 0.5 + 0.3 * np.cos(5 * yy), 0.3 + 0.4 * xx], axis=-1)
    image[height // 3:2 * height // 3, width // 4:width // 2] = 0.1
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def test_bundled_weights_leave_a_clean_photo_alone_and_undo_their_degradation():
    """A guard on what gets bundled (issue 16): replacing weights must not make a network damage
    clean photos, nor stop it restoring. Measured on this photo: 44-46 dB clean with the weights
    before issue 16, +15 dB on sigma 25; the denoiser trained for issue 16 gives 40.3 dB clean (it
    smooths a little more) and +16 dB. On the 9 px motion blur the deblurrer before issue 16
    gains +2.1 dB, the seventeenth session's +2.7 dB; on the rain the derainer gains +14.6 dB."""
    import numpy as np

    from service.engine import Engine
    from training.degradations import add_noise, add_rain, blur_then_record, motion_kernel
    from training.evaluate import WHOLE_IMAGES, psnr

    photo = _smooth_photo()
    rng = np.random.default_rng(0)
    degraded_and_least_gain = {
        "denoising": (add_noise(photo, rng, sigma=25), 10),
        "deblurring": (blur_then_record(photo, rng, motion_kernel(rng, length=9.0), noise_sigma=(1, 1),
                                        jpeg_chance=0), 1.5),
        "deraining": (add_rain(photo, rng), 6),
    }
    for task in TASKS:
        checkpoint = load_checkpoint(weights.bundled_path(task))
        engine = Engine(checkpoint.model, config=checkpoint.config, device="cpu", tile_size=0)
        assert psnr(WHOLE_IMAGES.restore(photo, engine.forward), photo) > 38, task
        degraded, least_gain = degraded_and_least_gain[task]
        assert psnr(WHOLE_IMAGES.restore(degraded, engine.forward), photo) > psnr(degraded, photo) + least_gain, task


def test_describe_lists_bundled_when_nothing_installed(install_dir):
    rows = {row["task"]: row for row in weights.describe()}
    assert sorted(rows) == sorted(TASKS)
    for task, row in rows.items():
        assert row["source"] == "bundled" and row["error"] is None
        assert Path(row["path"]) == weights.bundled_path(task)
        assert weights.resolve(task) == weights.bundled_path(task)


def test_installed_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MPRNET_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert weights.installed_dir() == tmp_path / "xdg" / "mprnet" / "weights"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.installed_dir() == tmp_path / "home" / ".local" / "share" / "mprnet" / "weights"
    monkeypatch.setenv("MPRNET_WEIGHTS_DIR", str(tmp_path / "explicit"))
    assert weights.installed_dir() == tmp_path / "explicit"


def test_missing_weights_name_files_and_install_command(install_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "empty")
    with pytest.raises(WeightsNotFound) as caught:
        weights.resolve("denoising")
    message = str(caught.value)
    assert str(install_dir / "denoising.pth") in message
    assert str(tmp_path / "empty" / "denoising.safetensors") in message
    assert "python -m service weights install denoising --from" in message
    assert weights.RELEASED_DRIVE_IDS["denoising"] in message
    assert isinstance(caught.value, LookupError)


# --------------------------------------------------------------------------------------------
# Installing
# --------------------------------------------------------------------------------------------

def test_install_from_url_verifies_hash_and_is_preferred(drive, install_dir, released_deraining):
    digest = hashlib.sha256(released_deraining.read_bytes()).hexdigest()
    path = weights.install("deraining", f"{drive}/files/deraining.pth", sha256=digest.upper(), progress=False,
                           allow_http=True)
    assert path == install_dir / "deraining.pth"
    assert sha256_file(path) == digest
    assert weights.resolve("deraining") == path
    assert load_checkpoint(path).config == RELEASED_CONFIGS["deraining"]
    row = next(r for r in weights.describe() if r["task"] == "deraining")
    assert row["source"] == "installed" and row["sha256"] == digest
    assert row["config"] == RELEASED_CONFIGS["deraining"].as_kwargs()
    assert _leftovers(install_dir) == ["deraining.pth"]


@pytest.mark.parametrize("source", [PAGE_ID, f"https://drive.google.com/file/d/{PAGE_ID}/view?usp=sharing",
                                    f"https://drive.google.com/uc?export=download&id={PAGE_ID}"])
def test_install_follows_drive_confirmation_page(drive, install_dir, released_deraining, source):
    path = weights.install("deraining", source, progress=False)
    assert path.read_bytes() == released_deraining.read_bytes()
    first, second = FakeDrive.requests[:2]
    assert first.startswith("/uc?") and f"id={PAGE_ID}" in first
    assert second.startswith("/download?") and "confirm=t" in second and "uuid=0f1e2d3c" in second


def test_install_from_local_path(install_dir, released_deraining):
    assert weights.install("deraining", str(released_deraining), progress=False) == install_dir / "deraining.pth"


def test_weights_list_names_an_installed_file_damaged_since_and_exits_1(install_dir, released_deraining):
    path = weights.install("deraining", str(released_deraining), progress=False)
    with open(path, "r+b") as handle:
        handle.truncate(1000)
    row = next(r for r in weights.describe() if r["task"] == "deraining")
    assert "not a readable PyTorch checkpoint" in row["error"]
    assert "sha256 differs from what was installed" in row["error"]
    listed = subprocess.run([sys.executable, "-m", "service", "weights", "list"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "MPRNET_WEIGHTS_DIR": str(install_dir)})
    assert listed.returncode == 1, listed.stdout + listed.stderr
    assert "error: " in listed.stdout and "sha256 differs" in listed.stdout


def test_install_sniffs_safetensors_and_replaces_previous(install_dir, released_deraining, tmp_path):
    as_safetensors = tmp_path / "download"  # no suffix, as Drive gives none
    save_safetensors(load_model(released_deraining), as_safetensors)
    weights.install("deraining", str(released_deraining), progress=False)
    path = weights.install("deraining", str(as_safetensors), progress=False)
    assert path == install_dir / "deraining.safetensors"
    assert _leftovers(install_dir) == ["deraining.safetensors"]


def test_wrong_hash_is_rejected_and_nothing_installed(drive, install_dir):
    with pytest.raises(WeightsInstallError, match="sha256 mismatch"):
        weights.install("deraining", f"{drive}/files/deraining.pth", sha256="0" * 64, progress=False, allow_http=True)
    assert _leftovers(install_dir) == []
    with pytest.raises(WeightsInstallError, match="64 hex digits"):
        weights.install("deraining", f"{drive}/files/deraining.pth", sha256="abc", progress=False, allow_http=True)


@pytest.mark.parametrize("name", ["other.pth", "garbage.bin"])
def test_not_an_mprnet_is_rejected(drive, install_dir, name):
    with pytest.raises(WeightsInstallError, match="not an MPRNet checkpoint"):
        weights.install("deraining", f"{drive}/files/{name}", progress=False, allow_http=True)
    assert _leftovers(install_dir) == []


def test_wrong_configuration_for_task_is_rejected(drive, install_dir):
    with pytest.raises(WeightsInstallError, match="wrong configuration for denoising") as caught:
        weights.install("denoising", f"{drive}/files/deraining.pth", progress=False, allow_http=True)
    assert "released deraining configuration" in str(caught.value)
    with pytest.raises(WeightsInstallError, match="wrong configuration for deraining"):
        weights.install("deraining", f"{drive}/files/tiny.safetensors", progress=False, allow_http=True)
    assert _leftovers(install_dir) == []


def test_failed_install_keeps_the_previous_one(drive, install_dir):
    good = weights.install("deraining", f"{drive}/files/deraining.pth", progress=False, allow_http=True)
    before = good.read_bytes()
    with pytest.raises(WeightsInstallError):
        weights.install("deraining", f"{drive}/files/tiny.safetensors", progress=False, allow_http=True)
    assert _leftovers(install_dir) == ["deraining.pth"] and good.read_bytes() == before


def test_download_errors_are_clear(drive, install_dir, tmp_path):
    with pytest.raises(WeightsInstallError, match="HTTP 404"):
        weights.install("deraining", f"{drive}/files/absent.pth", progress=False, allow_http=True)
    with pytest.raises(WeightsInstallError, match="web page instead of file"):
        weights.install("deraining", PRIVATE_ID, progress=False)
    with pytest.raises(WeightsInstallError, match="no such file"):
        weights.install("deraining", str(tmp_path / "absent.pth"), progress=False)
    with pytest.raises(WeightsInstallError, match="unknown task"):
        weights.install("colorizing", f"{drive}/files/deraining.pth", progress=False, allow_http=True)
    assert _leftovers(install_dir) == []
