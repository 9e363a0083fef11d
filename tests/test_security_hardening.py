"""Issue 15's fail-closed and browser-facing hardening, against the real service on loopback:
required API keys, the key checked before anything reveals configuration, plaintext keys kept
out of start-up errors, the security headers and a CDN-free /docs (in Chromium), and the API key
in the Python client and the remote CLI.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service import cli
from service.client import AsyncClient, Client, ServiceError
from service.config import Settings
from service.security import API_POLICY, PAGE_POLICY, hash_key

from service_helpers import encode, metric_value, random_image, running_server, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("first-client-key", "second-client-key")
MAX_UPLOAD_BYTES = 64 * 1024
# What a caller without a key must not learn from any answer.
CONFIGURATION = ("denoising", str(MAX_UPLOAD_BYTES), "queue")
SECURITY_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("weights") / "denoising.safetensors", seed=4)


def settings_for(weights: Path, **overrides) -> Settings:
    return Settings(**{"tasks": "denoising", "weights_denoising": weights, "device": "cpu", "tile_size": 32,
                       "tile_overlap": 8, "max_batch_size": 2, "max_upload_bytes": MAX_UPLOAD_BYTES,
                       "log_level": "warning", **overrides})


@pytest.fixture(scope="module")
def keyed_server(weights):
    settings = settings_for(weights, api_key_hashes=",".join(hash_key(key) for key in KEYS), require_api_keys=True)
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def open_server(weights):
    with running_server(settings_for(weights)) as running:
        yield running


def _clean_environment(**variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MPRNET_")}
    env.update(variables)
    return env


def upload(seed: int = 0) -> dict:
    return {"image": ("photo.png", encode(random_image(24, 20, seed=seed)), "image/png")}


# -- fail closed ----------------------------------------------------------------------------------

def test_required_keys_without_any_stop_the_start(weights, monkeypatch, capsys):
    with pytest.raises(ValidationError, match="require_api_keys is set but no API key hashes are configured"):
        Settings(require_api_keys=True)
    # The command line, as the Kubernetes manifest configures it: from the environment.
    for name in [name for name in os.environ if name.startswith("MPRNET_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MPRNET_REQUIRE_API_KEYS", "true")
    monkeypatch.setenv("MPRNET_API_KEY_HASHES", "")  # what an empty Secret key gives
    assert cli.main(["serve", "--tasks", "denoising", "--weights-denoising", str(weights), "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert "error: require_api_keys:" in error and "MPRNET_API_KEY_HASHES" in error
    # With a key configured the same settings are fine.
    assert settings_for(weights, api_key_hashes=hash_key(KEYS[0]), require_api_keys=True).require_api_keys


def test_a_mistyped_plaintext_key_is_never_printed(weights, monkeypatch, capsys):
    plaintext = "correct-horse-battery-staple"
    configured = f"{hash_key(KEYS[0])},{plaintext}"
    with pytest.raises(ValidationError) as raised:
        Settings(api_key_hashes=configured)
    assert "sha256 hex digests" in str(raised.value)
    assert plaintext not in str(raised.value) and plaintext not in repr(raised.value.errors())

    # `python -m service serve`, which prints each error's message.
    monkeypatch.setenv("MPRNET_API_KEY_HASHES", configured)
    assert cli.main(["serve", "--tasks", "denoising", "--weights-denoising", str(weights), "--port", "0"]) == 2
    printed = capsys.readouterr()
    assert "api_key_hashes" in printed.err and plaintext not in printed.out + printed.err

    # uvicorn's factory mode, which prints pydantic's whole error with its traceback.
    finished = subprocess.run(
        [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env=_clean_environment(MPRNET_API_KEY_HASHES=configured, MPRNET_TASKS="denoising",
                                         MPRNET_WEIGHTS_DENOISING=str(weights), MPRNET_DEVICE="cpu"),
        capture_output=True, text=True, timeout=120)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0 and "sha256 hex digests" in output, output
    assert plaintext not in output


def test_the_start_up_log_says_whether_keys_are_on(weights, caplog):
    with caplog.at_level(logging.INFO, logger="service.app"):
        with running_server(settings_for(weights, api_key_hashes=",".join(map(hash_key, KEYS))), wait_ready=False):
            pass
        with running_server(settings_for(weights), wait_ready=False):
            pass
    said = [record.getMessage() for record in caplog.records if record.getMessage().startswith("API keys")]
    assert said == ["API keys: on, 2 accepted", "API keys: off, anyone who can reach this service can use it"]


def _raw_request(url: str, head: str) -> bytes:
    address = httpx.URL(url)
    with socket.create_connection((address.host, address.port), timeout=10) as connection:
        connection.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def _without_key(answer: httpx.Response | bytes) -> None:
    text = answer.text if isinstance(answer, httpx.Response) else answer.decode("latin-1")
    status = answer.status_code if isinstance(answer, httpx.Response) else int(text.split()[1])
    assert status == 401, text
    body = text.split("\r\n\r\n", 1)[-1]
    assert not any(fact in body for fact in CONFIGURATION), body


def test_the_key_is_checked_before_admission_says_anything(keyed_server, monkeypatch, caplog):
    url, key = keyed_server.url, {"X-API-Key": KEYS[0]}
    caplog.set_level(logging.INFO, logger="service.requests")
    before = metric_value(keyed_server.metrics(), "mprnet_requests_total", code="401")

    # Unknown task: with a key the 404 lists the tasks; without one, only 401.
    assert httpx.post(f"{url}/v1/restore/colorizing", files=upload(), headers=key).status_code == 404
    _without_key(httpx.post(f"{url}/v1/restore/colorizing", files=upload()))

    # A declared oversize body: with a key the 413 tells the limit; without one, only 401.
    head = (f"POST /v1/restore/denoising HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {MAX_UPLOAD_BYTES * 4}\r\n")
    assert b" 413 " in _raw_request(url, head + f"X-API-Key: {KEYS[0]}\r\n\r\n").split(b"\r\n")[0]
    _without_key(_raw_request(url, head + "\r\n"))

    # A full queue: with a key a 503 with Retry-After; without one, only 401.
    batcher = keyed_server.service.batcher
    monkeypatch.setattr(type(batcher), "full", property(lambda self: True))
    full = httpx.post(f"{url}/v1/restore/denoising", files=upload(), headers=key)
    assert full.status_code == 503 and "retry-after" in full.headers
    _without_key(httpx.post(f"{url}/v1/restore/denoising", files=upload()))
    monkeypatch.undo()
    assert httpx.post(f"{url}/v1/restore/denoising", files=upload(), headers=key).status_code == 200

    # The 401s are still counted and logged: request accounting stays the outermost layer. (Its
    # line is written once the answer is sent, so it may land just after the client has it.)
    assert metric_value(keyed_server.metrics(), "mprnet_requests_total", code="401") == before + 3
    deadline = time.monotonic() + 10
    while not [line for line in (record.getMessage() for record in caplog.records if record.name == "service.requests")
               if '"status":401' in line and '"error":"missing_api_key"' in line and "colorizing" in line]:
        assert time.monotonic() < deadline, "no log line for the 401"
        time.sleep(0.05)


def test_no_method_gets_past_the_key_check_to_admission(keyed_server):
    # OPTIONS once went through unchecked (for CORS preflights, which the CORS layer outside
    # answers itself), and admission then named the tasks and the upload limit.
    _without_key(_raw_request(keyed_server.url, "OPTIONS /v1/restore/colorizing HTTP/1.1\r\nHost: x\r\n\r\n"))
    _without_key(_raw_request(keyed_server.url, "OPTIONS /v1/restore/denoising HTTP/1.1\r\nHost: x\r\n"
                                                f"Content-Length: {MAX_UPLOAD_BYTES * 4}\r\n\r\n"))


def test_requests_without_a_key_or_of_another_method_are_not_counted_as_a_tasks_restores(keyed_server):
    # Else anyone without a key could dilute a task's share of 5xx below the alert's threshold.
    url, key = keyed_server.url, {"X-API-Key": KEYS[0]}
    before = keyed_server.metrics()
    _without_key(httpx.post(f"{url}/v1/restore/denoising", files=upload()))
    assert httpx.get(f"{url}/v1/restore/denoising", headers=key).status_code == 405
    after = keyed_server.metrics()
    for code in ("401", "405"):
        assert metric_value(after, "mprnet_requests_total", task="denoising", code=code) == \
            metric_value(before, "mprnet_requests_total", task="denoising", code=code)
        assert metric_value(after, "mprnet_requests_total", task="unknown", code=code) == \
            metric_value(before, "mprnet_requests_total", task="unknown", code=code) + 1


def test_open_metrics_do_not_publish_the_weights_digest_the_key_guards(keyed_server, weights):
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    served = httpx.get(f"{keyed_server.url}/v1/models", headers={"X-API-Key": KEYS[0]}).json()
    assert served["models"]["denoising"]["weights_sha256"] == digest
    assert digest not in keyed_server.metrics()


def test_behind_a_root_path_the_key_admission_counting_and_policies_still_apply(weights):
    # Behind a proxy that strips /api, uvicorn --root-path /api puts the prefix back in front of
    # every path it hands on, and the router strips it again: checks that compared that path with
    # /v1/... once let every request through.
    settings = settings_for(weights, api_key_hashes=hash_key(KEYS[0]), require_api_keys=True)
    with running_server(settings, root_path="/api") as server:
        url, key = server.url, {"X-API-Key": KEYS[0]}
        _without_key(httpx.get(f"{url}/v1/models"))
        _without_key(httpx.post(f"{url}/v1/restore/denoising", files=upload()))
        assert httpx.post(f"{url}/v1/restore/colorizing", files=upload(), headers=key).status_code == 404
        assert httpx.post(f"{url}/v1/restore/denoising", files=upload(), headers=key).status_code == 200
        assert metric_value(server.metrics(), "mprnet_requests_total", task="denoising", code="200") == 1
        assert httpx.get(f"{url}/").headers["content-security-policy"] == PAGE_POLICY


@pytest.mark.parametrize("setting", ["request_timeout_s", "decode_timeout_s", "worker_stall_timeout_s",
                                     "graceful_shutdown_s"])
def test_a_timeout_of_forever_is_refused_at_start_up(weights, setting):
    # Accepted once, an infinite decode timeout failed every restore with 500, and an infinite
    # request or stall timeout left the service loading forever, with nothing in the log.
    with pytest.raises(ValidationError, match=setting):
        settings_for(weights, **{setting: float("inf")})
    with pytest.raises(ValidationError, match="decode_timeout_s"):
        settings_for(weights, decode_timeout_s=1e9)  # past what the wait on a decoder's pipe takes


def test_a_key_the_clients_could_not_send_gets_no_digest():
    made = subprocess.run([sys.executable, "-m", "service.security"], input="clé-ключ\n", cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 2 and made.stdout == ""
    assert "printable ASCII" in made.stderr and "clé" not in made.stderr


# -- security headers and /docs -------------------------------------------------------------------

def _headers_of(response: httpx.Response) -> dict[str, str]:
    return {name: response.headers.get(name) for name in SECURITY_HEADERS}


def test_every_answer_carries_the_security_headers(keyed_server):
    url, key = keyed_server.url, {"X-API-Key": KEYS[0]}
    answers = {
        "page": httpx.get(f"{url}/"), "page script": httpx.get(f"{url}/static/app.js"),
        "docs": httpx.get(f"{url}/docs"), "docs assets": httpx.get(f"{url}/swagger-ui/swagger-ui.css"),
        "schema": httpx.get(f"{url}/openapi.json"), "models": httpx.get(f"{url}/v1/models", headers=key),
        "restore": httpx.post(f"{url}/v1/restore/denoising", files=upload(), headers=key),
        "401": httpx.get(f"{url}/v1/models"), "404": httpx.get(f"{url}/no/such/page"),
        "probe": httpx.get(f"{url}/readyz"), "metrics": httpx.get(f"{url}/metrics"),
    }
    for what, response in answers.items():
        assert response.status_code in (200, 401, 404), (what, response.status_code)
        assert _headers_of(response) == SECURITY_HEADERS, what
    policies = {what: response.headers["content-security-policy"] for what, response in answers.items()}
    assert policies["page"] == policies["page script"] == PAGE_POLICY
    assert "default-src 'none'" in PAGE_POLICY and "frame-ancestors 'none'" in PAGE_POLICY
    for what in ("schema", "models", "restore", "401", "404", "probe", "metrics"):
        assert policies[what] == API_POLICY, what
    assert policies["docs"] == policies["docs assets"]


def test_docs_run_swagger_ui_from_the_service_itself(keyed_server):
    url = keyed_server.url
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200
    # Every script, stylesheet and icon comes from this origin: no CDN, so no integrity to check.
    references = re.findall(r'(?:src|href)="([^"]*)"', docs.text)
    assert references and all(reference.startswith("/") and not reference.startswith("//")
                              for reference in references), references
    assert "://" not in docs.text.replace("window.location.origin", "")
    for reference in references:
        assert httpx.get(f"{url}{reference}").status_code == 200, reference
    # The one inline script (Swagger UI's start) is allowed by its hash, and nothing else inline.
    (inline,) = re.findall(r"<script>(.*?)</script>", docs.text, re.S)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    policy = docs.headers["content-security-policy"]
    script_sources = re.search(r"script-src ([^;]*)", policy).group(1).split()
    assert script_sources == ["'self'", f"'sha256-{digest}'"]
    assert "unsafe" not in policy and "default-src 'none'" in policy


def _browser():
    chromium = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    reason = None
    if not chromium.exists():
        reason = f"no Chromium at {chromium}"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            reason = "the playwright package is not installed"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the browser checks (see .ci/deps.d/30-chromium.sh)")
        pytest.skip(reason)
    return sync_playwright, chromium


# Recorded from the first script on, before the page's own: every directive the page broke.
_COLLECT_VIOLATIONS = ("window.violations = []; document.addEventListener('securitypolicyviolation', "
                       "event => window.violations.push(`${event.violatedDirective} ${event.blockedURI}`));")


@pytest.mark.timeout(300)
def test_page_and_docs_work_under_their_policies_in_chromium(open_server, tmp_path):
    sync_playwright, chromium = _browser()
    url = open_server.url
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(random_image(40, 56, seed=9)))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium),
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.add_init_script(_COLLECT_VIOLATIONS)
            outside = []
            page.on("request", lambda request: None if request.url.startswith((url, "blob:", "data:"))
                    else outside.append(request.url))

            # The page: tasks from the API, an upload, the restored image shown from a blob: URL.
            page.goto(f"{url}/")
            page.wait_for_selector("#task-select:enabled")
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector("#result:not([hidden])")
            page.wait_for_function("document.getElementById('result-image').complete")
            assert page.eval_on_selector("#result-image", "img => img.naturalWidth") == 56
            assert page.evaluate("window.violations") == []

            # /docs: Swagger UI renders every operation and runs one against the service.
            page.goto(f"{url}/docs")
            page.wait_for_selector(".opblock")
            paths = page.eval_on_selector_all(".opblock-summary-path", "nodes => nodes.map(n => n.dataset.path)")
            assert {"/v1/restore/{task}", "/v1/models"} <= set(paths), paths
            page.click(".opblock-get:has([data-path='/v1/models']) .opblock-summary")
            page.click("button.try-out__btn")
            page.click("button.execute")
            status = page.wait_for_selector(".live-responses-table tbody td.response-col_status")
            assert status.inner_text().strip() == "200"
            assert page.evaluate("window.violations") == []
            assert outside == [], "the page and the docs must work without any other origin"

            # Another site that frames the service gets an empty frame. A fresh page, as content set
            # into this one would run under the docs' own policy, which allows no frames at all.
            framer = browser.new_page()
            framer.set_content(f'<iframe id="framed" src="{url}/"></iframe>', wait_until="load")
            assert framer.frame_locator("#framed").locator("#task-select").count() == 0
        finally:
            browser.close()


# -- the API key in clients -----------------------------------------------------------------------

def test_the_client_sends_its_key(keyed_server, tmp_path):
    url = keyed_server.url
    with Client(url, api_key=KEYS[1]) as client:
        assert "denoising" in client.models()["models"]
        assert client.restore(encode(random_image(20, 20, seed=2)), "denoising").png.startswith(b"\x89PNG")
        folder = tmp_path / "in"
        folder.mkdir()
        (folder / "a.png").write_bytes(encode(random_image(16, 16, seed=3)))
        # restore_folder runs an AsyncClient made from this client's arguments, key included.
        outcomes = client.restore_folder([folder], tmp_path / "out", "denoising")
        assert [outcome.ok for outcome in outcomes] == [True], outcomes
    with Client(url, retries=0) as client, pytest.raises(ServiceError) as refused:
        client.models()
    assert refused.value.status == 401 and refused.value.code == "missing_api_key"
    with Client(url, retries=0, api_key="wrong") as client, pytest.raises(ServiceError) as refused:
        client.models()
    assert refused.value.code == "invalid_api_key"

    async def with_async_client() -> bytes:
        async with AsyncClient(url, api_key=KEYS[0], headers={"X-Request-ID": "with-a-key"}) as client:
            return (await client.restore(encode(random_image(20, 20, seed=4)), "denoising")).png

    assert asyncio.run(with_async_client()).startswith(b"\x89PNG")


def test_remote_restore_takes_the_key_from_a_flag_or_the_environment(keyed_server, tmp_path, monkeypatch, capsys):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(random_image(20, 24, seed=6)))
    base = ["restore", str(photo), "--task", "denoising", "--url", keyed_server.url, "-q"]
    monkeypatch.delenv("MPRNET_API_KEY", raising=False)

    assert cli.main([*base, "-o", str(tmp_path / "none")]) == cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert "401" in error or "API key" in error
    assert "--api-key" in error and "MPRNET_API_KEY" in error
    assert not (tmp_path / "none" / "photo.png").exists()

    assert cli.main([*base, "-o", str(tmp_path / "flag"), "--api-key", KEYS[0]]) == cli.EXIT_OK
    assert (tmp_path / "flag" / "photo.png").read_bytes().startswith(b"\x89PNG")

    monkeypatch.setenv("MPRNET_API_KEY", KEYS[1])
    assert cli.main([*base, "-o", str(tmp_path / "env")]) == cli.EXIT_OK
    assert (tmp_path / "env" / "photo.png").is_file()
    # The flag wins over the environment.
    monkeypatch.setenv("MPRNET_API_KEY", "stale-key")
    assert cli.main([*base, "-o", str(tmp_path / "both"), "--api-key", KEYS[1]]) == cli.EXIT_OK
