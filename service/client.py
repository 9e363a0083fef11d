"""A Python client for the restoration service, sync (:class:`Client`) and async (:class:`AsyncClient`).

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:   # api_key: when the service wants one
        result = client.restore("photo.jpg", "denoising")
        Path("photo.png").write_bytes(result.png)
        print(result.request_id, result.timings)          # timings in ms, from Server-Timing
        report = client.restore_folder(["photos/"], "restored/", "denoising", concurrency=4)

Every error the API reports arrives as a :class:`ServiceError` subclass named after its status
(:class:`InvalidImage` for 400, :class:`Overloaded` for 503, ...), carrying the API's ``code``
and ``message``. A full queue or a service still loading (503) and refused or dropped connections
are retried with exponential backoff and jitter, waiting at least as long as ``Retry-After``
asks; everything else is raised at once, since sending the same image again cannot change it.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .client_errors import (
    REQUEST_ID_HEADER,
    ConnectionFailed,
    InternalError,
    InvalidImage,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Timeout,
    UnsupportedMediaType,
    ValidationError,
    error_from_response,
)
from .image_files import find_images

__all__ = ["Client", "AsyncClient", "RestoreResult", "FileOutcome", "ServiceError", "InvalidImage", "NotFound",
           "PayloadTooLarge", "UnsupportedMediaType", "ValidationError", "InternalError", "Overloaded", "Timeout",
           "ConnectionFailed"]

ImageInput = bytes | str | os.PathLike

# Uploads and inference of a large image take a while; the service's own limit is 120 s by
# default, so the read timeout leaves room for it to answer 504 itself.
DEFAULT_TIMEOUT = httpx.Timeout(180.0, connect=10.0)


# -- results ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestoreResult:
    png: bytes
    request_id: str
    timings: dict[str, float]  # milliseconds per step (decode, queue, inference, encode, total)
    attempts: int = 1  # requests sent, retries included


@dataclass(frozen=True)
class FileOutcome:
    """One input of :meth:`AsyncClient.restore_folder`: where its result went, or why it has none."""

    path: Path
    target: Path
    result: RestoreResult | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


OutcomeCallback = Callable[[FileOutcome], None]


class OutputTaken(ValueError):
    """Two inputs share a stem, so the second one's ``<stem>.png`` would overwrite the first's."""


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``"queue;dur=1.5, total;dur=9"`` -> ``{"queue": 1.5, "total": 9.0}``; entries without a
    duration are left out."""
    timings: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if name and key.strip().lower() == "dur":
                try:
                    timings[name] = float(number.strip().strip('"'))
                except ValueError:
                    pass
    return timings


# -- what both clients share ----------------------------------------------------------------------

def _upload(image: ImageInput) -> tuple[str, bytes, str]:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image), "application/octet-stream"
    path = Path(image)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return path.name, path.read_bytes(), content_type


def _result(response: httpx.Response, attempts: int) -> RestoreResult:
    return RestoreResult(png=response.content, request_id=response.headers.get(REQUEST_ID_HEADER, ""),
                         timings=parse_server_timing(response.headers.get("Server-Timing")), attempts=attempts)


_RETRIED_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                             httpx.RemoteProtocolError)


class _Policy:
    """How long to wait before the next attempt, or None to stop; shared by both clients."""

    def __init__(self, base_url: str, retries: int, backoff: float, max_wait: float):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff < 0 or max_wait < 0:
            raise ValueError("backoff and max_wait must be >= 0")
        self.base_url = base_url
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """``attempt`` counts from 1 for the request that just failed."""
        if attempt > self.retries:
            return None
        step = min(self.max_wait, self.backoff * 2 ** (attempt - 1))
        if retry_after is None:
            # "Equal jitter": never retry at once, yet clients that failed together spread out.
            return random.uniform(step / 2, step)
        if retry_after > self.max_wait:
            return None  # the service asks for a longer pause than this caller agreed to wait
        # At least what the service asked for; the jitter keeps clients told the same number of
        # seconds from all coming back in the same instant.
        return retry_after + random.uniform(0, step)

    def transport_error(self, exc: httpx.TransportError, attempts: int) -> ServiceError:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return Timeout(f"no answer from {self.base_url} within the client's timeout ({type(exc).__name__})",
                           code="client_timeout", status=None)
        reason = str(exc) or type(exc).__name__
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return ConnectionFailed(f"cannot reach {self.base_url}{tries}: {reason}", code="connection_failed",
                                status=None)


API_KEY_HEADER = "X-API-Key"


def _client_options(base_url: str, timeout: float | httpx.Timeout, headers: dict[str, str] | None,
                    api_key: str | None) -> dict:
    if api_key is not None:
        headers = {**(headers or {}), API_KEY_HEADER: api_key}
    return dict(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)


# -- sync ---------------------------------------------------------------------------------------

class Client:
    """A blocking client; use it as a context manager or call :meth:`close`.

    Args:
        base_url: where the service listens, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds (or an ``httpx.Timeout``) for each attempt.
        retries: further attempts after a 503 or a connection failure; 0 disables retrying.
        backoff: the first pause in seconds; it doubles with each retry.
        max_wait: longest pause between two attempts; a ``Retry-After`` beyond it ends the retries.
        headers: sent with every request (an ``Authorization`` for a gateway in front, say).
        api_key: the service's API key, sent as ``X-API-Key`` with every request.
    """

    def __init__(self, base_url: str, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, retries: int = 4,
                 backoff: float = 0.5, max_wait: float = 60.0, headers: dict[str, str] | None = None,
                 api_key: str | None = None):
        self._arguments = dict(base_url=base_url, timeout=timeout, retries=retries, backoff=backoff,
                               max_wait=max_wait, headers=headers, api_key=api_key)
        self._policy = _Policy(base_url.rstrip("/"), retries, backoff, max_wait)
        self._http = httpx.Client(**_client_options(base_url, timeout, headers, api_key))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, retry: bool = True, **kwargs: Any) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(method, url, **kwargs)
            except _RETRIED_TRANSPORT_ERRORS as exc:
                wait = self._policy.delay(attempt, None) if retry else None
                if wait is None:
                    raise self._policy.transport_error(exc, attempt) from exc
            except httpx.TransportError as exc:
                raise self._policy.transport_error(exc, attempt) from exc
            else:
                if response.is_success:
                    return response, attempt
                error = error_from_response(response)
                wait = self._policy.delay(attempt, error.retry_after) if retry and response.status_code == 503 else None
                if wait is None:
                    raise error
            time.sleep(wait)

    def restore(self, image: ImageInput, task: str, *, request_id: str | None = None) -> RestoreResult:
        """Restore one image (its bytes, or a path) with ``task``; the answer is always PNG."""
        name, data, content_type = _upload(image)
        # One id for every attempt, so the service's log ties the retries together.
        headers = {REQUEST_ID_HEADER: request_id or uuid.uuid4().hex}
        response, attempts = self._send("POST", f"/v1/restore/{quote(task, safe='')}",
                                        files={"image": (name, data, content_type)}, headers=headers)
        return _result(response, attempts)

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: readiness, batching limits, and the model card of each task."""
        return self._send("GET", "/v1/models")[0].json()

    def ready(self) -> bool:
        """Whether the service would take work now (``/readyz``); asked once, never retried."""
        try:
            self._send("GET", "/readyz", retry=False)
        except Overloaded:
            return False
        return True

    def restore_folder(self, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, task: str, *,
                       concurrency: int = 4, on_outcome: OutcomeCallback | None = None) -> list[FileOutcome]:
        """See :meth:`AsyncClient.restore_folder`; runs it on a private event loop, so not from
        inside a running one (``on_outcome`` is called on this thread)."""
        async def run() -> list[FileOutcome]:
            async with AsyncClient(**self._arguments) as client:
                return await client.restore_folder(inputs, out_dir, task, concurrency=concurrency,
                                                   on_outcome=on_outcome)
        return asyncio.run(run())


# -- async --------------------------------------------------------------------------------------

class AsyncClient:
    """The asyncio twin of :class:`Client`, with the same arguments."""

    def __init__(self, base_url: str, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, retries: int = 4,
                 backoff: float = 0.5, max_wait: float = 60.0, headers: dict[str, str] | None = None,
                 api_key: str | None = None):
        self._policy = _Policy(base_url.rstrip("/"), retries, backoff, max_wait)
        self._http = httpx.AsyncClient(**_client_options(base_url, timeout, headers, api_key))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, retry: bool = True, **kwargs: Any) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(method, url, **kwargs)
            except _RETRIED_TRANSPORT_ERRORS as exc:
                wait = self._policy.delay(attempt, None) if retry else None
                if wait is None:
                    raise self._policy.transport_error(exc, attempt) from exc
            except httpx.TransportError as exc:
                raise self._policy.transport_error(exc, attempt) from exc
            else:
                if response.is_success:
                    return response, attempt
                error = error_from_response(response)
                wait = self._policy.delay(attempt, error.retry_after) if retry and response.status_code == 503 else None
                if wait is None:
                    raise error
            await asyncio.sleep(wait)

    async def restore(self, image: ImageInput, task: str, *, request_id: str | None = None) -> RestoreResult:
        """Restore one image (its bytes, or a path) with ``task``; the answer is always PNG."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            name, data, content_type = _upload(image)
        else:
            name, data, content_type = await asyncio.to_thread(_upload, image)
        headers = {REQUEST_ID_HEADER: request_id or uuid.uuid4().hex}
        response, attempts = await self._send("POST", f"/v1/restore/{quote(task, safe='')}",
                                              files={"image": (name, data, content_type)}, headers=headers)
        return _result(response, attempts)

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``: readiness, batching limits, and the model card of each task."""
        return (await self._send("GET", "/v1/models"))[0].json()

    async def ready(self) -> bool:
        """Whether the service would take work now (``/readyz``); asked once, never retried."""
        try:
            await self._send("GET", "/readyz", retry=False)
        except Overloaded:
            return False
        return True

    async def restore_folder(self, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, task: str, *,
                             concurrency: int = 4, on_outcome: OutcomeCallback | None = None) -> list[FileOutcome]:
        """Restore every image in ``inputs`` (files, and folders searched recursively) into
        ``out_dir/<stem>.png``, at most ``concurrency`` requests at a time.

        Returns one :class:`FileOutcome` per input file, in input order; a file that failed has
        its ``error`` (a :class:`ServiceError`, an ``OSError`` reading it, or :class:`OutputTaken`
        when an earlier input already claimed the same ``<stem>.png``) and nothing written.
        ``on_outcome``, if given, receives each outcome as soon as it is known (to drive a
        progress bar, say), in completion order.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        outcomes: list[FileOutcome | None] = []
        work: asyncio.Queue[tuple[int, Path, Path]] = asyncio.Queue()
        claimed: dict[Path, Path] = {}
        report = on_outcome or (lambda outcome: None)
        for index, path in enumerate(_files_to_restore(inputs)):
            target = out / f"{path.stem}.png"
            if target in claimed:
                outcomes.append(FileOutcome(path, target, error=OutputTaken(
                    f"skipped, its result {target} is already taken by {claimed[target]}")))
                report(outcomes[-1])
                continue
            claimed[target] = path
            outcomes.append(None)
            work.put_nowait((index, path, target))

        async def worker() -> None:
            while not work.empty():
                index, path, target = work.get_nowait()
                try:
                    result = await self.restore(path, task)
                    await asyncio.to_thread(_write_atomically, target, result.png)
                except (ServiceError, OSError) as exc:
                    outcomes[index] = FileOutcome(path, target, error=exc)
                else:
                    outcomes[index] = FileOutcome(path, target, result=result)
                report(outcomes[index])

        await asyncio.gather(*(worker() for _ in range(min(concurrency, max(1, work.qsize())))))
        return outcomes  # type: ignore[return-value]  # every slot is filled by now


def _files_to_restore(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for entry in map(Path, inputs):
        # Anything but a folder is kept as given, even if missing, so that its outcome carries the
        # error of reading it instead of the input silently dropping out of the results.
        files.extend(find_images([entry])[0] if entry.is_dir() else [entry])
    return files


def _write_atomically(target: Path, data: bytes) -> None:
    # A run stopped midway must not leave a truncated PNG under the final name, which a rerun
    # or a downstream job would take for a finished result.
    partial = target.with_name(f".{target.name}.part")
    partial.write_bytes(data)
    partial.replace(target)

