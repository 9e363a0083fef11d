"""The weights installer as an attacker's server would meet it (issue 15): plain http, a redirect
to http, an endless or over-declared body, a file that is not the one asked for. A real HTTP
server on loopback plays the hostile host; https cannot be served here without a certificate,
so the redirect policy itself is also checked on real httpx responses.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import httpx
import pytest
import torch

from models import RELEASED_CONFIGS, save_safetensors, weights
from models.weights import WeightsInstallError, check_redirect, install, installed_manifest
from service import cli

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> bytes:
    """A random-weight checkpoint of the released deraining configuration (the installer
    refuses any other), as bytes to serve."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "deraining.safetensors"
    save_safetensors(RELEASED_CONFIGS["deraining"].build(), path)
    return path.read_bytes()


class HostileHost(http.server.BaseHTTPRequestHandler):
    """``/file`` is the checkpoint; ``/to-http`` redirects to it over http; ``/endless`` streams
    past any cap without declaring a length; ``/declares-too-much`` declares a huge body."""

    checkpoint = b""
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        path = self.path.split("?")[0]
        if path == "/file":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(self.checkpoint)))
            self.end_headers()
            self.wfile.write(self.checkpoint)
        elif path == "/to-http":
            host, port = self.server.server_address
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{port}/file")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/endless":
            # HTTP/1.0 style: no length, the body ends when the connection closes (or never).
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * MIB)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the installer hung up, as it should
            self.close_connection = True
        elif path == "/declares-too-much":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(10 * 1024 * MIB))
            self.end_headers()
            self.wfile.write(b"\0" * 1024)
            self.close_connection = True
        else:
            self.send_error(404)


@pytest.fixture
def host(checkpoint):
    HostileHost.checkpoint = checkpoint
    HostileHost.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _nothing_installed(folder: Path) -> None:
    # No weights, no partial download, no manifest entry.
    leftovers = sorted(path.name for path in folder.iterdir()) if folder.exists() else []
    assert leftovers == []


def test_plain_http_is_refused_unless_allowed(host, install_dir):
    with pytest.raises(WeightsInstallError, match="plain http is refused.*--allow-http"):
        install("deraining", f"{host}/file", progress=False)
    assert HostileHost.requests == [], "refused before connecting"
    _nothing_installed(install_dir)


def test_an_allowed_http_install_records_and_prints_its_sha256(host, install_dir, checkpoint, capsys):
    digest = hashlib.sha256(checkpoint).hexdigest()
    assert cli.main(["weights", "install", "deraining", "--from", f"{host}/file?token=s3cret", "--allow-http",
                     "--sha256", digest, "-q"]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert f"sha256: {digest}" in printed.splitlines()
    assert (install_dir / "deraining.safetensors").read_bytes() == checkpoint
    entry = installed_manifest()["deraining"]
    assert entry["sha256"] == digest and entry["file"] == "deraining.safetensors"
    assert entry["bytes"] == len(checkpoint) and entry["installed_at"].endswith("Z")
    # A signed link's token is not kept on disk.
    assert entry["source"] == f"{host}/file" and "s3cret" not in (install_dir / "manifest.json").read_text()
    assert sorted(path.name for path in install_dir.iterdir()) == ["deraining.safetensors", "manifest.json"]


def test_a_redirect_to_http_is_refused_even_when_http_is_allowed(host, install_dir):
    with pytest.raises(WeightsInstallError, match="redirects are followed only to https"):
        install("deraining", f"{host}/to-http", progress=False, allow_http=True)
    assert HostileHost.requests == ["/to-http"], "the http target was never asked"
    _nothing_installed(install_dir)


def _redirect(status: int, source: str, location: str) -> httpx.Response:
    return httpx.Response(status, headers={"Location": location}, request=httpx.Request("GET", source))


def test_the_redirect_policy_on_real_responses():
    for refused in (_redirect(302, "https://drive.example/uc", "http://drive.example/file"),  # downgrade
                    _redirect(301, "https://drive.example/uc", "http://127.0.0.1:8080/admin"),  # inside the network
                    _redirect(307, "http://mirror.example/a", "http://mirror.example/b"),
                    _redirect(302, "https://drive.example/uc", "ftp://drive.example/file"),
                    _redirect(303, "http://drive.example/uc", "//drive.example/file")):  # inherits http
        with pytest.raises(WeightsInstallError, match="only to https"):
            check_redirect(refused)
    for allowed in (_redirect(302, "https://drive.example/uc", "https://usercontent.example/file"),
                    _redirect(301, "https://drive.example/uc", "/download?id=1"),  # same https origin
                    _redirect(308, "http://mirror.example/a", "https://mirror.example/a"),  # an upgrade
                    httpx.Response(200, request=httpx.Request("GET", "http://mirror.example/a")),
                    httpx.Response(304, request=httpx.Request("GET", "https://mirror.example/a"))):
        check_redirect(allowed)


def test_a_page_leads_nowhere_weaker_than_itself():
    with pytest.raises(WeightsInstallError, match="not https"):
        weights._check_followed_url("http://drive.example/download", came_from="https://drive.example/uc")
    weights._check_followed_url("https://drive.example/download", came_from="https://drive.example/uc")


@pytest.mark.parametrize("path", ["/endless", "/declares-too-much"])
def test_the_size_cap_stops_a_download_and_leaves_nothing(host, install_dir, path):
    with pytest.raises(WeightsInstallError, match="over the limit of 4194304 bytes"):
        install("deraining", f"{host}{path}", progress=False, allow_http=True, max_bytes=4 * MIB)
    _nothing_installed(install_dir)


def test_the_size_cap_holds_for_local_files_and_from_the_command_line(host, install_dir, tmp_path, checkpoint,
                                                                      capsys):
    local = tmp_path / "big.safetensors"
    local.write_bytes(checkpoint)
    with pytest.raises(WeightsInstallError, match="over the limit"):
        install("deraining", str(local), progress=False, max_bytes=len(checkpoint) - 1)
    assert cli.main(["weights", "install", "deraining", "--from", f"{host}/endless", "--allow-http",
                     "--max-mb", "2", "-q"]) == cli.EXIT_SOME_FAILED
    assert "over the limit of 2097152 bytes" in capsys.readouterr().err
    _nothing_installed(install_dir)
    # The default leaves room for the released checkpoints (the largest, deblurring, ~80 MB).
    assert weights.DEFAULT_MAX_BYTES >= 256 * MIB


def test_a_sha256_mismatch_is_refused_and_keeps_the_previous_install(host, install_dir, checkpoint):
    install("deraining", f"{host}/file", progress=False, allow_http=True)
    recorded = (install_dir / "manifest.json").read_text()
    with pytest.raises(WeightsInstallError, match="sha256 mismatch"):
        install("deraining", f"{host}/file", sha256="0" * 64, progress=False, allow_http=True)
    assert (install_dir / "deraining.safetensors").read_bytes() == checkpoint
    assert (install_dir / "manifest.json").read_text() == recorded
    assert json.loads(recorded)["deraining"]["sha256"] == hashlib.sha256(checkpoint).hexdigest()
    assert sorted(path.name for path in install_dir.iterdir()) == ["deraining.safetensors", "manifest.json"]
