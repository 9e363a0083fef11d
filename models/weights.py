"""Which weights each task uses, and installing the paper's released ones.

Two places hold weights. The project's own small models ship inside the package
(``models/weights/<task>.safetensors``, listed with their sha256 in ``manifest.json``, both
written by ``python -m training.bundle``). The
paper's released checkpoints, which are larger and better, are installed by the user into
:func:`installed_dir`; when present they are preferred.

Installing verifies before it stores: the file is downloaded (or copied) to a temporary file next
to its destination, checked against the sha256 when one is given, loaded as an MPRNet and
compared with the task's released configuration, and only then renamed into place, so a failed
or interrupted install never leaves a file that :func:`resolve` would pick up. What was installed
(file, sha256, size, source, time) is recorded in ``manifest.json`` beside it.

Downloads are held to what a checkpoint download needs: https only (plain http only when the
caller allows it, and then only for the URL given), redirects only to https, pages reached from
a Drive page never over a weaker scheme than the page, and at most ``max_bytes``
(:data:`DEFAULT_MAX_BYTES`), checked against the declared length before the body and counted
while it streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

# .checkpoint (PyTorch) is imported where a checkpoint is read: task names and paths come without it.

__all__ = ["TASKS", "RELEASED_DRIVE_IDS", "DEFAULT_MAX_BYTES", "WeightsNotFound", "WeightsInstallError",
           "bundled_path", "installed_dir", "resolve", "install", "describe", "manifest", "installed_manifest",
           "changed_since_install", "check_redirect"]

TASKS = ("deblurring", "denoising", "deraining")

RELEASED_DRIVE_IDS = {
    "deblurring": "1QwQUVbk6YVOJViCsOKYNykCsdJSVGRtb",
    "denoising": "1LODPt9kYmxwU98g96UrRA0_Eh5HYcsRw",
    "deraining": "1O3WEJbcat7eTY6doXWeorAbQ1l_WmMnM",
}

BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
SUFFIXES = (".pth", ".safetensors")

# Drive's public download endpoint. Files over about 100 MB come back as an HTML page ("can't
# scan this file for viruses") whose form leads to the file; see _drive_download.
DRIVE_URL = "https://drive.google.com/uc"
DRIVE_USERCONTENT_URL = "https://drive.usercontent.google.com/download"
_DRIVE_ID = re.compile(r"^[A-Za-z0-9_-]{25,}$")

# The largest released checkpoint (deblurring) is about 80 MB; the cap leaves room for larger
# future ones while stopping a server that streams without end from filling the disk.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
# Drive's confirmation page is a few kB; more than this is not that page.
_MAX_PAGE_BYTES = 1024 * 1024
INSTALLED_MANIFEST = "manifest.json"


class WeightsNotFound(LookupError):
    """No weights for a task, neither installed nor bundled; the message says how to get them."""


class WeightsInstallError(ValueError):
    """An install that was refused or failed; nothing was installed."""


def _check_task(task: str, error: type[Exception] = ValueError) -> None:
    if task not in TASKS:
        raise error(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def bundled_path(task: str) -> Path:
    """The project's own weights for ``task``, shipped in the package."""
    _check_task(task)
    return BUNDLED_DIR / f"{task}.safetensors"


def installed_dir() -> Path:
    """Where installed weights live: ``$MPRNET_WEIGHTS_DIR``, else
    ``$XDG_DATA_HOME/mprnet/weights``, else ``~/.local/share/mprnet/weights``."""
    configured = os.environ.get("MPRNET_WEIGHTS_DIR")
    if configured:
        return Path(configured).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "mprnet" / "weights"


def _installed(task: str) -> Path | None:
    for suffix in SUFFIXES:
        candidate = installed_dir() / f"{task}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _install_hint(task: str) -> str:
    return (f"python -m service weights install {task} --from "
            f"https://drive.google.com/file/d/{RELEASED_DRIVE_IDS[task]}/view")


def resolve(task: str) -> Path:
    """The weights ``task`` uses: installed released weights if any, else the bundled ones."""
    _check_task(task)
    installed = _installed(task)
    if installed is not None:
        return installed
    bundled = bundled_path(task)
    if bundled.is_file():
        return bundled
    looked = [str(installed_dir() / f"{task}{suffix}") for suffix in SUFFIXES] + [str(bundled)]
    raise WeightsNotFound(f"no {task} weights: none of {', '.join(looked)} exists. Install the released "
                          f"weights with: {_install_hint(task)}")


def manifest() -> dict:
    """The bundled weights' manifest: per task its file, sha256, configuration and fp16 flag."""
    path = BUNDLED_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def describe() -> list[dict]:
    """One row per task for ``weights list``: task, path, source (installed, bundled or missing),
    sha256, config (the constructor keywords) and error (why a file is unusable, else None)."""
    from .checkpoint import CheckpointError, infer_config, load_state_dict, sha256_file

    rows = []
    listed = manifest()
    try:
        recorded, damaged_record = installed_manifest(), None
    except WeightsInstallError as exc:
        # Listed under every task: none of them can be checked against it or installed until it is fixed.
        recorded, damaged_record = {}, str(exc)
    for task in TASKS:
        row = {"task": task, "path": None, "source": "missing", "sha256": None, "config": None, "error": None}
        installed = _installed(task)
        if installed is not None:
            row.update(path=str(installed), source="installed", sha256=sha256_file(installed))
            try:
                row["config"] = infer_config(load_state_dict(installed)).as_kwargs()
            except CheckpointError as exc:
                row["error"] = str(exc)
            if recorded.get(task, {}).get("sha256") not in (None, row["sha256"]):
                # Changed since `weights install` wrote it: damaged on disk, or replaced by hand.
                row["error"] = "; ".join(filter(None, [row["error"], f"sha256 differs from what was installed "
                                                                    f"({recorded[task]['sha256']})"]))
        elif bundled_path(task).is_file():
            path = bundled_path(task)
            entry = listed.get(task, {})
            row.update(path=str(path), source="bundled", sha256=sha256_file(path), config=entry.get("config"))
            if entry.get("sha256") not in (None, row["sha256"]):
                row["error"] = f"sha256 differs from the manifest ({entry['sha256']})"
        else:
            row["error"] = f"not installed; run: {_install_hint(task)}"
        if damaged_record is not None:
            row["error"] = "; ".join(filter(None, [row["error"], damaged_record]))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Installing
# ---------------------------------------------------------------------------------------------

class _FormReader(HTMLParser):
    """Collects the download form of Drive's confirmation page: its action and hidden inputs."""

    def __init__(self):
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and self.action is None:
            self.action, self._in_form = attrs.get("action") or "", True
        elif tag == "input" and self._in_form and attrs.get("name"):
            self.fields[attrs["name"]] = attrs.get("value") or ""
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


def _drive_id(source: str) -> str | None:
    """The Drive file id in a bare id or a Drive share/download URL, else None."""
    if _DRIVE_ID.match(source) and not Path(source).exists():
        return source
    parsed = urlparse(source)
    if parsed.scheme not in ("http", "https") or "google.com" not in parsed.netloc:
        return None
    match = re.search(r"/d/([A-Za-z0-9_-]+)", parsed.path)
    if match:
        return match.group(1)
    ids = parse_qs(parsed.query).get("id")
    return ids[0] if ids else None


def _is_html(response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip().lower() == "text/html"


def _too_large(what: str, size: int, max_bytes: int) -> WeightsInstallError:
    return WeightsInstallError(f"{what} is {size} bytes or more, over the limit of {max_bytes} bytes "
                               f"(raise it with --max-mb if the checkpoint really is that large)")


def _declared_length(response) -> int | None:
    declared = response.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


def _stream_to(response, handle, progress: bool, label: str, max_bytes: int) -> str:
    from tqdm import tqdm
    declared = _declared_length(response)
    if declared is not None and declared > max_bytes:
        # Refused before a byte of the body is read.
        raise _too_large(str(response.url), declared, max_bytes)
    digest = hashlib.sha256()
    written = 0
    with tqdm(total=declared or None, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
              disable=not progress) as bar:
        for chunk in response.iter_bytes(1 << 20):
            # Counted, not trusted from the header: a body may run past what it declared, or
            # declare nothing (chunked).
            written += len(chunk)
            if written > max_bytes:
                raise _too_large(str(response.url), written, max_bytes)
            handle.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _read_page(response) -> str:
    declared = _declared_length(response)
    if declared is not None and declared > _MAX_PAGE_BYTES:
        raise _too_large(f"the web page at {response.url}", declared, _MAX_PAGE_BYTES)
    body = bytearray()
    for chunk in response.iter_bytes(1 << 16):
        body += chunk
        if len(body) > _MAX_PAGE_BYTES:
            raise _too_large(f"the web page at {response.url}", len(body), _MAX_PAGE_BYTES)
    return body.decode(response.encoding or "utf-8", errors="replace")


def check_redirect(response) -> None:
    """Event hook for every response httpx receives: refuses a redirect to anything but https.

    A redirect is the server's choice, not the user's, so ``--allow-http`` does not extend to
    it; this is what stops an https download from being downgraded to http, or sent to an http
    service inside the network the installer runs in."""
    if not response.has_redirect_location:
        return
    target = response.request.url.join(response.headers["location"])
    if target.scheme != "https":
        raise WeightsInstallError(f"{response.request.url} redirected to {target}: redirects are followed only "
                                  f"to https URLs")


def _check_followed_url(url: str, came_from: str) -> None:
    """A URL taken from a page (Drive's confirmation form) is never fetched over a weaker scheme
    than the page itself came over."""
    if urlparse(came_from).scheme == "https" and urlparse(url).scheme != "https":
        raise WeightsInstallError(f"the page at {came_from} leads to {url}, which is not https; refused")


def _download(client, url: str, handle, progress: bool, label: str, max_bytes: int,
              params: dict | None = None) -> tuple[str | None, tuple[str, str] | None]:
    """Stream ``url`` into ``handle``: returns (sha256, None), or (None, (page URL, page text))
    with nothing written when the server answered with an HTML page, which is how Drive asks
    for confirmation."""
    import httpx
    with client.stream("GET", url, params=params) as response:
        if response.status_code >= 400:
            raise WeightsInstallError(f"download failed: {response.request.url} answered HTTP {response.status_code}")
        try:
            if _is_html(response):
                return None, (str(response.url), _read_page(response))
            return _stream_to(response, handle, progress, label, max_bytes), None
        except httpx.HTTPError as exc:
            raise WeightsInstallError(f"download of {url} broke off: {exc}") from None


def _drive_download(client, file_id: str, handle, progress: bool, label: str, max_bytes: int) -> str:
    """Drive serves small files directly; for large ones it answers with a page whose form (or,
    on older pages, a link with ``confirm=``) leads to the file. Follow whichever the page has,
    then try the direct endpoint with ``confirm=t`` before giving up."""
    digest, page = _download(client, DRIVE_URL, handle, progress, label, max_bytes,
                             params={"export": "download", "id": file_id})
    if digest is not None:
        return digest
    page_url, text = page
    reader = _FormReader()
    reader.feed(text)
    attempts = []
    if reader.action is not None and reader.fields:
        attempts.append((urljoin(page_url, reader.action), reader.fields))
    for link in reader.links:
        if "confirm=" in link:
            attempts.append((urljoin(page_url, link), None))
    attempts.append((DRIVE_USERCONTENT_URL, {"id": file_id, "export": "download", "confirm": "t"}))
    for url, params in attempts:
        _check_followed_url(url, page_url)
        digest, _ = _download(client, url, handle, progress, label, max_bytes, params=params)
        if digest is not None:
            return digest
    raise WeightsInstallError(
        f"Google Drive returned a web page instead of file {file_id} (the file may not be shared publicly, "
        f"or its daily download quota is used up); download it in a browser and install the local file "
        f"with --from PATH")


def _fetch(source: str, handle, progress: bool, label: str, allow_http: bool, max_bytes: int) -> str:
    """Copy or download ``source`` into ``handle``; returns the sha256 of what was written."""
    local = Path(source).expanduser()
    if local.is_file():
        size = local.stat().st_size
        if size > max_bytes:
            raise _too_large(str(local), size, max_bytes)
        digest = hashlib.sha256()
        with open(local, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                handle.write(block)
                digest.update(block)
        return digest.hexdigest()
    file_id = _drive_id(source)
    scheme = urlparse(source).scheme
    if file_id is None and scheme not in ("http", "https"):
        raise WeightsInstallError(f"{source}: no such file, and not an http(s) URL or a Google Drive id")
    if file_id is None and scheme == "http" and not allow_http:
        raise WeightsInstallError(f"{source}: plain http is refused, as anyone on the way could swap the file; "
                                  f"use an https URL, or --allow-http (with --sha256) for a trusted network")
    import httpx
    try:
        with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0),
                          event_hooks={"response": [check_redirect]}) as client:
            if file_id is not None:
                return _drive_download(client, file_id, handle, progress, label, max_bytes)
            digest, _ = _download(client, source, handle, progress, label, max_bytes)
            if digest is None:
                raise WeightsInstallError(f"{source} returned a web page, not a checkpoint file")
            return digest
    except httpx.HTTPError as exc:
        raise WeightsInstallError(f"download of {source} failed: {exc}") from None


def _suffix_of(path: Path) -> str:
    """safetensors files start with an 8-byte header length and then a JSON object; anything
    else is treated as a PyTorch file, which the loader checks."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return ".safetensors" if len(head) == 9 and head[8:9] == b"{" else ".pth"


def _matching_task(config) -> str | None:
    from .checkpoint import RELEASED_CONFIGS

    return next((task for task, released in RELEASED_CONFIGS.items() if released == config), None)


def installed_manifest() -> dict:
    """What :func:`install` recorded: per task its file, sha256, bytes, source and install time.
    Raises :class:`WeightsInstallError` naming the file when it is unreadable or not such a record."""
    path = installed_dir() / INSTALLED_MANIFEST
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsInstallError(f"{path}: the record of installed weights is unreadable ({reason}); "
                                  f"repair or delete it, then install again") from None
    if not isinstance(entries, dict):
        damage = f"it holds a {type(entries).__name__}, not a JSON object"
    else:
        damage = next((f"its entry {task!r} is not a JSON object" for task, entry in entries.items()
                       if not isinstance(entry, dict)), None)
    if damage is not None:
        raise WeightsInstallError(f"{path}: the record of installed weights is damaged ({damage}); "
                                  f"repair or delete it, then install again")
    return entries


def changed_since_install(path: Path, sha256: str) -> str | None:
    """Why ``path``, holding bytes of digest ``sha256``, is not what :func:`install` wrote there:
    damaged on disk or replaced by hand; None when it is, or when it is not an installed file."""
    task = path.stem
    if task not in TASKS or path.resolve().parent != installed_dir().resolve():
        return None
    try:
        recorded = installed_manifest().get(task, {}).get("sha256")
    except WeightsInstallError as exc:
        return str(exc)
    if recorded is not None and not isinstance(recorded, str):
        return f"{installed_dir() / INSTALLED_MANIFEST}: the record of {task} is damaged (its sha256 is no text)"
    if recorded not in (None, sha256):
        return f"{path}: sha256 {sha256[:12]} differs from what was installed ({recorded[:12]})"
    return None


def _recorded_source(source: str) -> str:
    """``source`` as the manifest keeps it: a URL without credentials, query or fragment, where
    signed download links carry their tokens."""
    parsed = urlparse(source)
    if parsed.scheme not in ("http", "https"):
        return source
    host = parsed.hostname or ""
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return parsed._replace(netloc=netloc, query="", fragment="").geturl()


def _write_record(task: str, staged: Path, final: Path, digest: str, source: str) -> Path:
    """The manifest with ``task``'s new entry, written beside it (to be renamed over it once the
    weights are in place): reading or writing it can fail, so it is done before any weights file
    is replaced."""
    entries = installed_manifest()
    entries[task] = {"file": final.name, "sha256": digest, "bytes": staged.stat().st_size,
                     "source": _recorded_source(source),
                     "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    partial = installed_dir() / f".{INSTALLED_MANIFEST}.partial"
    try:
        partial.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise WeightsInstallError(f"cannot write {partial}: {exc}") from None
    return partial


def install(task: str, source: str, sha256: str | None = None, progress: bool = True, *,
            allow_http: bool = False, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Install ``source`` as the weights of ``task`` and return where it was stored.

    ``source`` is an https URL (http only with ``allow_http``), a Google Drive file id or share
    URL, or a local path, of at most ``max_bytes``. The file must match ``sha256`` when given,
    and must load as an MPRNet with the released configuration of ``task``. Raises
    :class:`WeightsInstallError` otherwise, leaving any previously installed file as it was. The
    file's sha256 is recorded in :func:`installed_manifest`.
    """
    from .checkpoint import RELEASED_CONFIGS, CheckpointError, load_checkpoint

    _check_task(task, WeightsInstallError)
    if max_bytes < 1:
        raise WeightsInstallError(f"the size limit must be at least 1 byte, got {max_bytes}")
    expected = sha256.strip().lower() if sha256 else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise WeightsInstallError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    target_dir = installed_dir()
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsInstallError(f"cannot create {target_dir}: {exc}") from None
    # A damaged record is refused before the download, not found after it.
    installed_manifest()
    # The temporary file sits in the target folder so the final rename is atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{task}-", suffix=".partial", dir=target_dir)
    tmp = Path(tmp_name)
    staged = record = None
    try:
        with os.fdopen(fd, "wb") as handle:
            digest = _fetch(source, handle, progress, f"{task} weights", allow_http, max_bytes)
        if expected is not None and digest != expected:
            raise WeightsInstallError(f"{source}: sha256 mismatch: expected {expected}, got {digest}")
        # The loader picks the format by suffix; Drive gives no file name, so look at the bytes.
        staged = tmp.with_suffix(_suffix_of(tmp))
        os.replace(tmp, staged)
        try:
            config = load_checkpoint(staged).config
        except CheckpointError as exc:
            reason = str(exc).removeprefix(str(staged) + ": ").removeprefix("not an MPRNet checkpoint: ")
            raise WeightsInstallError(f"{source}: not an MPRNet checkpoint: {reason}") from None
        released = RELEASED_CONFIGS[task]
        if config != released:
            other = _matching_task(config)
            hint = f" (that is the released {other} configuration)" if other else ""
            raise WeightsInstallError(
                f"{source}: wrong configuration for {task}: the file is an MPRNet with "
                f"{config.as_kwargs()}{hint}, but the released {task} model has {released.as_kwargs()}")
        final = target_dir / f"{task}{staged.suffix}"
        record = _write_record(task, staged, final, digest, source)
        os.replace(staged, final)
        staged = None
        for suffix in SUFFIXES:
            # One installed file per task, so resolve() never has to choose between two.
            stale = target_dir / f"{task}{suffix}"
            if stale != final and stale.exists():
                stale.unlink()
        os.replace(record, target_dir / INSTALLED_MANIFEST)
        record = None
        return final
    finally:
        for leftover in (tmp, staged, record):
            if leftover is not None and leftover.exists():
                leftover.unlink()
