"""A Python client for the restoration service, sync (:class:`Client`) and async (:class:`AsyncClient`).

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:   # api_key: when the service wants one
        result = client.restore("photo.jpg", "denoising")
        Path("photo.png").write_bytes(result.png)
        print(result.request_id, result.timings)          # timings in ms, from Server-Timing
        client.restore("large.jpg", "deblurring", progress=lambda p: print(f"{p.done}/{p.total} tiles"))
        report = client.restore_folder(["photos/"], "restored/", "denoising", concurrency=4)

Every error the API reports arrives as a :class:`ServiceError` subclass named after its status
(:class:`InvalidImage` for 400, :class:`Overloaded` for 503, ...), carrying the API's ``code``
and ``message``. A full queue or a service still loading (503) and refused or dropped connections
are retried with exponential backoff and jitter, waiting at least as long as ``Retry-After``
asks; everything else is raised at once, since sending the same image again cannot change it.

With ``progress``, a restore is answered as a stream of events (:mod:`service.client_results`):
the callback gets a :class:`Progress` each time more tiles are done, and the outcome is the
same result, or the same error, retried by the same rules, as without it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import mimetypes
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
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
from .client_results import (
    EVENT_STREAM,
    Progress,
    ProgressCallback,
    RestoreEvents,
    RestoreResult,
    is_event_stream,
    parse_server_timing,
    plain_result,
)
from .client_retries import RetryPolicy
from .image_files import as_paths, find_images, result_targets, write_atomically

__all__ = ["Client", "AsyncClient", "RestoreResult", "Progress", "FileOutcome", "ServiceError", "InvalidImage",
           "NotFound", "PayloadTooLarge", "UnsupportedMediaType", "ValidationError", "InternalError", "Overloaded",
           "Timeout", "ConnectionFailed", "parse_server_timing"]

ImageInput = bytes | str | os.PathLike
T = TypeVar("T")

# Uploads and inference of a large image take a while; the service's own limit is 120 s by
# default, so the read timeout leaves room for it to answer 504 itself. httpx applies it to each
# read, so an event stream (``progress``) only needs an event or a keep-alive within it.
DEFAULT_TIMEOUT = httpx.Timeout(180.0, connect=10.0)


# -- results ------------------------------------------------------------------------------------

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
FileProgressCallback = Callable[[Path, Progress], None]


class OutputTaken(ValueError):
    """A file's ``<stem>.png`` would overwrite an input, or the result of an earlier input with the same stem."""


# -- what both clients share ----------------------------------------------------------------------

def _upload(image: ImageInput) -> tuple[str, bytes, str]:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image), "application/octet-stream"
    path = Path(image)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # A name in another encoding than the file system's (Latin-1 on a UTF-8 system, say) holds
    # undecodable bytes that no multipart header can carry; the service only logs the name.
    filename = path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return filename, path.read_bytes(), content_type


def _restore_request(task: str, upload: tuple[str, bytes, str], request_id: str | None,
                     progress: ProgressCallback | None) -> dict[str, Any]:
    # One id for every attempt, so the service's log ties the retries together.
    headers = {REQUEST_ID_HEADER: request_id or uuid.uuid4().hex}
    if progress is not None:
        headers["Accept"] = EVENT_STREAM
    return dict(url=f"/v1/restore/{quote(task, safe='')}", files={"image": upload}, headers=headers)


API_KEY_HEADER = "X-API-Key"


def _client_options(base_url: str, timeout: float | httpx.Timeout, headers: dict[str, str] | None,
                    api_key: str | None) -> dict:
    if api_key is not None:
        # A key read from a file or a Secret often ends in a newline, which no header may carry.
        api_key = api_key.strip()
        if not (api_key and api_key.isascii() and api_key.isprintable()):
            raise ValueError("api_key is empty, or has characters an HTTP header cannot carry (it is not shown here)")
        headers = {**(headers or {}), API_KEY_HEADER: api_key}
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"the service URL {base_url!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"the service URL must be http://host:port or https://host:port, got {base_url!r}")
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
        api_key: the service's API key, sent as ``X-API-Key`` with every request (without surrounding
            whitespace, such as the final newline of a key read from a file).
    """

    def __init__(self, base_url: str, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, retries: int = 4,
                 backoff: float = 0.5, max_wait: float = 60.0, headers: dict[str, str] | None = None,
                 api_key: str | None = None):
        self._arguments = dict(base_url=base_url, timeout=timeout, retries=retries, backoff=backoff,
                               max_wait=max_wait, headers=headers, api_key=api_key)
        self._policy = RetryPolicy(base_url.rstrip("/"), retries, backoff, max_wait)
        self._http = httpx.Client(**_client_options(base_url, timeout, headers, api_key))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _retrying(self, attempt_once: Callable[[], T], retry: bool = True) -> tuple[T, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return attempt_once(), attempt
            except (httpx.TransportError, Overloaded) as failure:
                wait = self._policy.wait_after(failure, attempt, retry)
            time.sleep(wait)

    def _get(self, url: str) -> httpx.Response:
        response = self._http.get(url)
        if not response.is_success:
            raise error_from_response(response)
        return response

    def restore(self, image: ImageInput, task: str, *, request_id: str | None = None,
                progress: ProgressCallback | None = None) -> RestoreResult:
        """Restore one image (its bytes, or a path) with ``task``; the answer is always PNG.

        ``progress``, if given, is called with a :class:`Progress` as the service finishes tiles
        (at most four times a second), from 0 done to all of them; a retried attempt reports
        from 0 again. An exception it raises ends the restore, and the service stops working on it.
        """
        request = _restore_request(task, _upload(image), request_id, progress)
        result, attempts = self._retrying(lambda: self._restore_once(request, progress))
        return replace(result, attempts=attempts)

    def _restore_once(self, request: dict[str, Any], progress: ProgressCallback | None) -> RestoreResult:
        with self._http.stream("POST", **request) as response:
            if progress is None or not is_event_stream(response):
                response.read()
                return plain_result(response)
            events = RestoreEvents(response, progress)
            for line in response.iter_lines():
                if events.feed(line):
                    break
            return events.outcome()

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: readiness, batching limits, and the model card of each task."""
        return self._retrying(lambda: self._get("/v1/models"))[0].json()

    def ready(self) -> bool:
        """Whether the service would take work now (``/readyz``); asked once, never retried."""
        try:
            self._retrying(lambda: self._get("/readyz"), retry=False)
        except Overloaded:
            return False
        return True

    def restore_folder(self, inputs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                       task: str, *, concurrency: int = 4, on_outcome: OutcomeCallback | None = None,
                       on_progress: FileProgressCallback | None = None) -> list[FileOutcome]:
        """See :meth:`AsyncClient.restore_folder`; runs it on a private event loop, so not from
        inside a running one (``on_outcome`` and ``on_progress`` are called on this thread)."""
        async def run() -> list[FileOutcome]:
            async with AsyncClient(**self._arguments) as client:
                return await client.restore_folder(inputs, out_dir, task, concurrency=concurrency,
                                                   on_outcome=on_outcome, on_progress=on_progress)
        return asyncio.run(run())


# -- async --------------------------------------------------------------------------------------

class AsyncClient:
    """The asyncio twin of :class:`Client`, with the same arguments."""

    def __init__(self, base_url: str, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, retries: int = 4,
                 backoff: float = 0.5, max_wait: float = 60.0, headers: dict[str, str] | None = None,
                 api_key: str | None = None):
        self._policy = RetryPolicy(base_url.rstrip("/"), retries, backoff, max_wait)
        self._http = httpx.AsyncClient(**_client_options(base_url, timeout, headers, api_key))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _retrying(self, attempt_once: Callable[[], Awaitable[T]], retry: bool = True) -> tuple[T, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await attempt_once(), attempt
            except (httpx.TransportError, Overloaded) as failure:
                wait = self._policy.wait_after(failure, attempt, retry)
            await asyncio.sleep(wait)

    async def _get(self, url: str) -> httpx.Response:
        response = await self._http.get(url)
        if not response.is_success:
            raise error_from_response(response)
        return response

    async def restore(self, image: ImageInput, task: str, *, request_id: str | None = None,
                      progress: ProgressCallback | None = None) -> RestoreResult:
        """Restore one image (its bytes, or a path) with ``task``; the answer is always PNG.

        ``progress`` as in :meth:`Client.restore`: a plain function, called in the event loop
        between reads of the stream. A coroutine function is refused rather than awaited, which
        would hold the stream's reading up for whatever it awaits; it can start a task itself.
        """
        if inspect.iscoroutinefunction(progress):
            raise TypeError("progress must be a plain function, not a coroutine function: it is called, not awaited")
        if isinstance(image, (bytes, bytearray, memoryview)):
            upload = _upload(image)
        else:
            upload = await asyncio.to_thread(_upload, image)
        request = _restore_request(task, upload, request_id, progress)
        result, attempts = await self._retrying(lambda: self._restore_once(request, progress))
        return replace(result, attempts=attempts)

    async def _restore_once(self, request: dict[str, Any], progress: ProgressCallback | None) -> RestoreResult:
        async with self._http.stream("POST", **request) as response:
            if progress is None or not is_event_stream(response):
                await response.aread()
                return plain_result(response)
            events = RestoreEvents(response, progress)
            async for line in response.aiter_lines():
                if events.feed(line):
                    break
            return events.outcome()

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``: readiness, batching limits, and the model card of each task."""
        return (await self._retrying(lambda: self._get("/v1/models")))[0].json()

    async def ready(self) -> bool:
        """Whether the service would take work now (``/readyz``); asked once, never retried."""
        try:
            await self._retrying(lambda: self._get("/readyz"), retry=False)
        except Overloaded:
            return False
        return True

    async def restore_folder(self, inputs: str | os.PathLike | Iterable[str | os.PathLike],
                             out_dir: str | os.PathLike, task: str, *, concurrency: int = 4,
                             on_outcome: OutcomeCallback | None = None,
                             on_progress: FileProgressCallback | None = None) -> list[FileOutcome]:
        """Restore every image in ``inputs`` (one path, or several: files, and folders searched
        recursively, leaving out ``out_dir`` when it lies inside one) into ``out_dir/<stem>.png``,
        at most ``concurrency`` requests at a time; a file named twice is restored once.

        Returns one :class:`FileOutcome` per input file, in input order; a file that failed has
        its ``error`` (a :class:`ServiceError`, an ``OSError`` reading it, or :class:`OutputTaken`
        when its ``<stem>.png`` is an input, or an earlier input already claimed it) and nothing
        written.
        ``on_outcome``, if given, receives each outcome as soon as it is known (to drive a
        progress bar, say), in completion order. ``on_progress``, if given, receives
        ``(path, Progress)`` as each file's tiles are done (see :meth:`restore`'s ``progress``).
        An exception raised by either callback stops the whole run and propagates, with no list of
        outcomes; results already written stay on disk.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        outcomes: list[FileOutcome | None] = []
        work: asyncio.Queue[tuple[int, Path, Path]] = asyncio.Queue()
        report = on_outcome or (lambda outcome: None)
        for index, (path, target, skipped) in enumerate(result_targets(_files_to_restore(inputs, out), out)):
            if skipped:
                outcomes.append(FileOutcome(path, target, error=OutputTaken(skipped)))
                report(outcomes[-1])
                continue
            outcomes.append(None)
            work.put_nowait((index, path, target))

        async def worker() -> None:
            while not work.empty():
                index, path, target = work.get_nowait()
                try:
                    progress = None if on_progress is None else functools.partial(_calling_back, on_progress, path)
                    result = await self.restore(path, task, progress=progress)
                    await asyncio.to_thread(write_atomically, target, result.png)
                except (ServiceError, OSError) as exc:
                    outcomes[index] = FileOutcome(path, target, error=exc)
                else:
                    outcomes[index] = FileOutcome(path, target, result=result)
                report(outcomes[index])

        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, max(1, work.qsize())))))
        except _CallbackRaised as raised:
            raise raised.error from None
        return outcomes  # type: ignore[return-value]  # every slot is filled by now


class _CallbackRaised(Exception):
    """Carries what the caller's progress callback raised past the handling of one file's errors:
    a BrokenPipeError of the caller's is not an OSError of reading or writing that file."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


def _calling_back(on_progress: FileProgressCallback, path: Path, progress: Progress) -> None:
    try:
        on_progress(path, progress)
    except Exception as exc:
        raise _CallbackRaised(exc) from exc


def _files_to_restore(inputs: str | os.PathLike | Iterable[str | os.PathLike], out_dir: Path) -> list[Path]:
    files: list[Path] = []
    for entry in as_paths(inputs):
        # Anything but a folder is kept as given, even if missing, so that its outcome carries the
        # error of reading it instead of the input silently dropping out of the results.
        files.extend(find_images(entry, leave_out=out_dir)[0] if entry.is_dir() else [entry])
    return files
