"""The HTTP service: upload -> decode -> tiles -> batching queue -> stitch -> PNG.

``create_app(settings)`` builds everything; nothing is read from module globals, so tests and
hosts can run several apps side by side. Also usable as ``uvicorn service.app:create_app
--factory`` or ``uvicorn service.app:app`` (both read settings from ``MPRNET_*``).

Start-up: the server accepts connections at once and answers ``/healthz``, while the models
load and warm up in the background; ``/readyz`` turns 200 only when every task is warm, so an
orchestrator routes traffic only to instances that can serve it.
"""

import asyncio
import functools
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Path, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import imaging
from .batching import Batcher, DeadlineExceeded, QueueClosed, QueueFull, TooManyTiles
from .config import Settings, default_queued_tiles
from .engine import Engine, resolve_devices
from .metrics import CONTENT_TYPE_LATEST, UNKNOWN_TASK, ServiceMetrics
from .security import ApiKeyGuard
from .web import mount_web

__all__ = ["create_app", "ServiceState", "ServiceError"]

log = logging.getLogger(__name__)
request_log = logging.getLogger("service.requests")

RESTORE_PREFIX = "/v1/restore/"
REQUEST_ID_HEADER = "X-Request-ID"
# Echoed into a response header and the logs, so only a safe alphabet and a bounded length.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_NOT_READY_RETRY_AFTER_S = 5
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CODE_BY_STATUS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                   415: "unsupported_media_type", 422: "validation_error", 500: "internal_error",
                   503: "unavailable", 504: "timeout"}


# -- errors -------------------------------------------------------------------------------------

class ServiceError(StarletteHTTPException):
    """An error with its API code; rendered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code", examples=["invalid_image"])
    message: str = Field(description="what went wrong, for people")


class ErrorBody(BaseModel):
    error: ErrorDetail


def _error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    def note_in_log(request: Request, code: str) -> None:
        entry = getattr(request.state, "log_entry", None)
        if entry is not None:
            entry["error"] = code

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _CODE_BY_STATUS.get(exc.status_code, "http_error")
        note_in_log(request, code)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 413 and not isinstance(exc, ServiceError):
            # Starlette's streaming body limit, hit by a body without Content-Length.
            limit = request.app.state.service.settings.max_upload_bytes
            message = f"the request body is larger than the limit of {limit} bytes"
        return _error_response(exc.status_code, code, message, exc.headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "path", "query"))
            problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid"))
        message = "; ".join(problems) or "the request is not valid"
        if any(error.get("loc", ())[-1:] == ("image",) for error in exc.errors()):
            message += " (send the image as a multipart/form-data file field named 'image')"
        note_in_log(request, "validation_error")
        return _error_response(422, "validation_error", message)

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        log.error("unhandled error in request %s", request_id, exc_info=exc)
        note_in_log(request, "internal_error")
        return _error_response(500, "internal_error", f"internal error (request {request_id})")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)


# -- shared state -------------------------------------------------------------------------------

class ModelCard(BaseModel):
    architecture: dict[str, int | bool] = Field(description="MPRNet constructor values")
    parameters: int
    weights_file: str = Field(description="checkpoint file name")
    weights_sha256: str
    device: str = Field(description="the first of devices")
    devices: list[str] = Field(description="every device holding a copy of this model, one inference worker each")
    precision: str
    tile_size: int
    tile_overlap: int


class ModelsResponse(BaseModel):
    ready: bool
    workers: list[str] = Field(description="the inference workers, named as in the batch metrics' device label")
    max_batch_size: int
    max_batch_wait_ms: float
    max_queued_tiles: int
    models: dict[str, ModelCard] = Field(description="per task; only tasks whose model has loaded")


class ServiceState:
    """Everything the request handlers share: settings, metrics, engines, the batching queue."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ServiceMetrics(settings.max_batch_size)
        self.metrics.queue_capacity.set(settings.max_queued_tiles)
        self.metrics.readiness.set_function(lambda: float(self.ready))
        self.engines: dict[str, Engine] = {}  # per task, the first worker's; cuts and stitches for all
        self.workers: dict[str, dict[str, Engine]] = {}  # worker name -> task -> its engine
        self.cards: dict[str, ModelCard] = {}
        self.batcher: Batcher | None = None
        self.draining = False
        self.load_error: str | None = None
        # Called when the models cannot be loaded; `serve` uses it to exit instead of idling unready.
        self.on_load_failure: Callable[[], None] | None = None
        # Decoding, cutting, stitching and encoding; sized to the cores so a burst of uploads
        # cannot starve the inference thread with dozens of busy decoders.
        self.imaging_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                               thread_name_prefix="mprnet-imaging")

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.running and not self.draining and self.load_error is None

    def not_ready_reason(self) -> str:
        if self.load_error is not None:
            return f"the models failed to load: {self.load_error}"
        if self.draining:
            return "the service is shutting down"
        if self.batcher is None:
            return "the models are still loading"
        return "the inference worker is restarting"

    async def run_in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.imaging_pool, function, *args)

    async def load(self) -> None:
        """Load and warm every task's engine on every device, then open the queue; readiness follows."""
        settings = self.settings
        try:
            devices = resolve_devices(settings.devices or (settings.device,))
            names = _worker_names(devices)
            options = dict(precision=settings.precision, tile_size=settings.tile_size,
                           tile_overlap=settings.tile_overlap, max_batch_size=settings.max_batch_size,
                           channels_last=settings.channels_last, compile=settings.compile,
                           cuda_graphs=settings.cuda_graphs)
            sizing = settings.auto_size and devices[0].type == "cuda"
            if sizing:
                options.update(tile_size="auto", max_batch_size="auto")
            for task in settings.tasks:
                path = settings.weights_path(task)
                started = time.monotonic()
                for name, device in zip(names, devices):
                    # A copy per worker: Engine moves its model onto its device in place.
                    engine = await asyncio.to_thread(functools.partial(Engine.from_checkpoint, path, device=device,
                                                                       **options))
                    if sizing:
                        settings = self._adopt_sizes(engine)
                        options.update(tile_size=settings.tile_size, max_batch_size=settings.max_batch_size)
                        sizing = False
                    # A full batch, so that the largest allocation happens now, not under load.
                    await asyncio.to_thread(engine.warmup, settings.max_batch_size)
                    self.workers.setdefault(name, {})[task] = engine
                engine = self.workers[names[0]][task]
                digest = engine.weights_sha256
                description = engine.describe()
                device_list = [str(device) for device in devices]
                self.cards[task] = ModelCard(weights_file=path.name, weights_sha256=digest, devices=device_list,
                                             **description)
                self.metrics.add_model(task, {**description.pop("architecture"), **description,
                                              "device": ",".join(dict.fromkeys(device_list)), "weights_sha256": digest})
                self.engines[task] = engine
                log.info("loaded %s from %s (sha256 %s, %d parameters) on %s in %.1f s", task, path, digest[:12],
                         engine.parameter_count, ", ".join(names), time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - reported through readiness and the log instead
            self.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("cannot serve: %s", self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        batcher = Batcher(workers={name: {task: engine.forward for task, engine in engines.items()}
                                   for name, engines in self.workers.items()},
                          max_batch_size=settings.max_batch_size, max_wait_s=settings.max_batch_wait_ms / 1000,
                          max_queued_tiles=settings.max_queued_tiles, observer=self.metrics)
        batcher.start()
        self.metrics.watch_queue(batcher.depth_by_task)
        self.batcher = batcher
        log.info("ready: serving %s", ", ".join(self.engines))

    def _adopt_sizes(self, engine: Engine) -> Settings:
        """The first engine's automatic sizes serve every worker and task, since the queue has one
        tile shape and one batch limit; max_batch_size stays the ceiling, and the queue grows if
        the largest upload would no longer fit in it."""
        settings = self.settings
        batch = min(engine.max_batch_size, settings.max_batch_size)
        engine.max_batch_size = batch
        queued = max(settings.max_queued_tiles,
                     default_queued_tiles(settings.max_pixels, engine.tile_size, settings.tile_overlap))
        self.settings = settings.model_copy(update={"tile_size": engine.tile_size, "max_batch_size": batch,
                                                    "max_queued_tiles": queued})
        self.metrics.queue_capacity.set(queued)
        log.info("auto sizing: tile_size %d, max_batch_size %d, max_queued_tiles %d",
                 engine.tile_size, batch, queued)
        return self.settings

    async def close(self) -> None:
        self.draining = True
        if self.batcher is not None:
            await self.batcher.close(grace_s=self.settings.graceful_shutdown_s)
        self.imaging_pool.shutdown(wait=False, cancel_futures=True)


def _worker_names(devices: list) -> list[str]:
    """Each worker's name: its device, numbered ("cpu#0", "cpu#1") where a device has several,
    so that metrics tell their batches apart."""
    counts, seen = Counter(map(str, devices)), Counter()
    names = []
    for device in map(str, devices):
        names.append(device if counts[device] == 1 else f"{device}#{seen[device]}")
        seen[device] += 1
    return names


def get_service(request: Request) -> ServiceState:
    return request.app.state.service


Service = Annotated[ServiceState, Depends(get_service)]


# -- per-request accounting ---------------------------------------------------------------------

class RequestAccounting:
    """Request id, metrics and one log line for every request, whatever layer answered it.

    Pure ASGI rather than a route dependency because some answers never reach a route: the
    413 for a declared oversize body (sent here, before a byte of it is read), 404s for unknown
    paths, and 422s from FastAPI's own validation.
    """

    def __init__(self, app: ASGIApp, service: ServiceState):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        client_id = headers.get(REQUEST_ID_HEADER.lower(), "")
        request_id = client_id if _CLIENT_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex
        path = scope["path"]
        entry: dict[str, Any] = {"request_id": request_id, "method": scope["method"], "path": path}
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=started, log_entry=entry)

        is_restore = path.startswith(RESTORE_PREFIX)
        task = path[len(RESTORE_PREFIX):]
        task_label = task if task in self.service.settings.tasks else UNKNOWN_TASK
        status = 500  # what the client sees if the app raises before answering

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()),
                                      (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
            await send(message)

        metrics = self.service.metrics
        if is_restore:
            metrics.in_flight.labels(task_label).inc()
        try:
            refusal = self._refuse_before_reading(task, headers) if is_restore else None
            if refusal is not None:
                # Answered before reading the body: nothing of it is buffered.
                entry["error"] = refusal.code
                await _error_response(refusal.status_code, refusal.code, refusal.detail, refusal.headers)(
                    scope, receive, send_with_request_id)
            else:
                await self.app(scope, receive, send_with_request_id)
        finally:
            seconds = time.monotonic() - started
            entry.update(status=status, duration_ms=round(seconds * 1000, 2))
            if is_restore:
                metrics.in_flight.labels(task_label).dec()
                metrics.requests.labels(task_label, str(status)).inc()
                metrics.request_duration.labels(task_label).observe(seconds)
            level = logging.DEBUG if path in _PROBE_PATHS and status < 400 else logging.INFO
            request_log.log(level, json.dumps(entry, separators=(",", ":")))

    def _refuse_before_reading(self, task: str, headers: dict[str, str]) -> "ServiceError | None":
        tasks = self.service.settings.tasks
        if task not in tasks:
            return ServiceError(404, "unknown_task", f"no task {task!r} here; this service restores: {', '.join(tasks)}")
        declared = headers.get("content-length", "")
        limit = self.service.settings.max_upload_bytes
        if declared.isdigit() and int(declared) > limit:
            return ServiceError(413, "payload_too_large", f"the upload is {int(declared)} bytes; the limit is {limit} bytes")
        batcher = self.service.batcher
        if batcher is not None and batcher.full:
            # Refusing now, before the upload is read and decoded, is what keeps the cost of a
            # refusal small while clients far outnumber what the device can take.
            return ServiceError(503, "queue_full", "the inference queue is full; retry later",
                                {"Retry-After": str(batcher.retry_after_s())})
        return None


# -- the restore pipeline -----------------------------------------------------------------------

def _decode_and_cut(engine: Engine, data: bytes, max_pixels: int, max_tiles: int):
    decoded = imaging.decode(data, max_pixels)
    # Planned before cutting so that an image with too many tiles (a 1 x 10^6 strip, say)
    # is refused before its tiles are allocated.
    planned = len(engine.plan(decoded.height, decoded.width))
    if planned > max_tiles:
        raise TooManyTiles(f"the {decoded.width}x{decoded.height} image needs {planned} tiles; "
                           f"at most {max_tiles} fit in the queue")
    plan, tiles = engine.cut(decoded.rgb)
    return decoded, plan, tiles


def _stitch_and_encode(engine: Engine, plan, outputs: np.ndarray, decoded: imaging.DecodedImage) -> bytes:
    return imaging.encode_png(engine.stitch(plan, outputs), decoded)


def _milliseconds(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def _restore(service: ServiceState, task: str, data: bytes, deadline: float, entry: dict) -> tuple[bytes, dict]:
    """The upload's bytes -> restored PNG bytes and the time spent in each step."""
    settings, metrics = service.settings, service.metrics
    engine = service.engines[task]
    timings: dict[str, float] = {}
    mark = time.monotonic()
    decoded, plan, tiles = await service.run_in_thread(_decode_and_cut, engine, data, settings.max_pixels,
                                                       settings.max_queued_tiles)
    timings["decode"] = time.monotonic() - mark
    entry.update(width=decoded.width, height=decoded.height, format=decoded.format, tiles=len(tiles))
    metrics.image_megapixels.labels(task).observe(decoded.width * decoded.height / 1e6)
    metrics.request_tiles.labels(task).observe(len(tiles))

    result = await service.batcher.submit(task, tiles, deadline)
    timings["queue"], timings["inference"] = result.queue_seconds, result.inference_seconds
    metrics.queue_wait.labels(task).observe(result.queue_seconds)
    entry.update(queue_ms=_milliseconds(result.queue_seconds), inference_ms=_milliseconds(result.inference_seconds))

    mark = time.monotonic()
    png = await service.run_in_thread(_stitch_and_encode, engine, plan, result.outputs, decoded)
    timings["encode"] = time.monotonic() - mark
    return png, timings


async def _until_disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _restore_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["restore"])
    error_responses = {status: {"model": ErrorBody, "description": description} for status, description in {
        400: "The upload is not a decodable image (`invalid_image`).",
        404: "No such task on this service (`unknown_task`).",
        413: "The upload is over the byte limit (`payload_too_large`) or the image over the pixel limit "
             "(`image_too_large`).",
        415: "An image format or kind the service does not take (`unsupported_media_type`).",
        422: "The multipart field `image` is missing, not a file, or sent twice (`validation_error`).",
        503: "The queue is full (`queue_full`) or the models are not ready (`not_ready`); see `Retry-After`.",
        504: "The request was not finished within the service's time limit (`timeout`).",
    }.items()}

    @router.post(
        "/v1/restore/{task}",
        response_class=Response,
        max_body_size=settings.max_upload_bytes,
        summary="Restore an image",
        description=(
            "Send one image as the multipart/form-data file field `image` (PNG, JPEG, WebP, BMP or TIFF, "
            f"at most {settings.max_upload_bytes} bytes and {settings.max_pixels} pixels). The answer is a PNG "
            "of the same size: grayscale stays grayscale, alpha is kept, EXIF orientation is applied.\n\n"
            "Headers: `X-Request-ID` (yours, echoed, or a new one) and `Server-Timing` with `decode`, "
            "`queue`, `inference`, `encode` and `total` in milliseconds."),
        responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                         "description": "The restored image as PNG."},
                   **error_responses},
    )
    async def restore(
        request: Request,
        service: Service,
        task: Annotated[str, Path(description="which restoration to run",
                                  json_schema_extra={"enum": list(settings.tasks)})],
        image: Annotated[UploadFile, File(description="the image to restore: PNG, JPEG, WebP, BMP or TIFF")],
    ) -> Response:
        # Unknown tasks and oversize bodies were refused by RequestAccounting before the upload was read.
        if service.batcher is None or service.load_error is not None:
            raise ServiceError(503, "not_ready", service.not_ready_reason(),
                               {"Retry-After": str(_NOT_READY_RETRY_AFTER_S)})
        if len((await request.form()).getlist("image")) > 1:
            # Which of several images to restore is not ours to guess.
            raise ServiceError(422, "validation_error", "send exactly one multipart file field named 'image'")
        entry = request.state.log_entry
        entry["task"] = task
        deadline = request.state.started + service.settings.request_timeout_s
        data = await image.read()
        entry["bytes"] = len(data)

        work = asyncio.ensure_future(_restore(service, task, data, deadline, entry))
        client_gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.wait({work, client_gone}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            client_gone.cancel()
        if not work.done():
            work.cancel()  # drops this request's queued tiles
            if client_gone.done() and not client_gone.cancelled():
                entry["error"] = "client_disconnected"
                return Response(status_code=499)  # nginx's code for it; only the log ever sees it
            raise ServiceError(504, "timeout", f"the image was not restored within "
                                               f"{service.settings.request_timeout_s:g} s")
        try:
            png, timings = work.result()
        except imaging.ImageError as exc:
            raise ServiceError(exc.status_code, exc.code, str(exc)) from None
        except TooManyTiles as exc:
            raise ServiceError(413, "image_too_large", str(exc)) from None
        except QueueFull as exc:
            raise ServiceError(503, "queue_full", f"{exc}; retry later",
                               {"Retry-After": str(exc.retry_after_s)}) from None
        except QueueClosed as exc:
            raise ServiceError(503, "not_ready", str(exc), {"Retry-After": str(_NOT_READY_RETRY_AFTER_S)}) from None
        except DeadlineExceeded:
            raise ServiceError(504, "timeout", f"the image was not restored within "
                                               f"{service.settings.request_timeout_s:g} s") from None
        except Exception as exc:
            log.error("restoring failed in request %s", request.state.request_id, exc_info=exc)
            raise ServiceError(500, "inference_failed",
                               f"the model failed on this image (request {request.state.request_id})") from None
        timings["total"] = time.monotonic() - request.state.started
        server_timing = ", ".join(f"{name};dur={_milliseconds(seconds)}" for name, seconds in timings.items())
        return Response(content=png, media_type="image/png", headers={"Server-Timing": server_timing})

    return router


# -- operations endpoints -----------------------------------------------------------------------

def _operations_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="Liveness: the process answers HTTP")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: every model loaded and warmed up, not shutting down",
                responses={503: {"model": ErrorBody, "description": "loading, failed to load, or draining"}})
    async def readyz(service: Service) -> dict[str, str]:
        if not service.ready:
            raise ServiceError(503, "not_ready", service.not_ready_reason(),
                               {"Retry-After": str(_NOT_READY_RETRY_AFTER_S)})
        return {"status": "ready"}

    @router.get("/v1/models", summary="The model behind each task", response_model=ModelsResponse)
    async def list_models(service: Service) -> ModelsResponse:
        settings = service.settings
        return ModelsResponse(ready=service.ready, workers=list(service.workers),
                              max_batch_size=settings.max_batch_size,
                              max_batch_wait_ms=settings.max_batch_wait_ms,
                              max_queued_tiles=settings.max_queued_tiles, models=service.cards)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics(service: Service) -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router


# -- the app ------------------------------------------------------------------------------------

def create_app(settings: Settings | None = None) -> FastAPI:
    """The service as an ASGI app; models load in the background once it starts."""
    settings = settings or Settings()
    service = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("settings:\n%s", settings.summary())
        loading = asyncio.create_task(service.load(), name="mprnet-load-models")
        try:
            yield
        finally:
            service.draining = True
            loading.cancel()
            await service.close()

    app = FastAPI(
        title="MPRNet image restoration",
        description="Deblurring, denoising and deraining with MPRNet (Zamir et al., CVPR 2021). Upload an "
                    "image, get the restored PNG. Errors are JSON: `{\"error\": {\"code\", \"message\"}}`.",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    _install_error_handlers(app)
    # Added innermost first: CORS answers preflights before the key check, and RequestAccounting
    # logs and counts the 401s the guard gives.
    app.add_middleware(ApiKeyGuard, key_hashes=settings.api_key_hashes, protect_health=settings.protect_health,
                       protect_metrics=settings.protect_metrics, error_response=_error_response)
    app.add_middleware(RequestAccounting, service=service)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", REQUEST_ID_HEADER],
                           expose_headers=[REQUEST_ID_HEADER, "Server-Timing", "Retry-After"])
    app.include_router(_restore_router(settings))
    app.include_router(_operations_router())
    mount_web(app)
    return app


@functools.cache
def _app_from_environment() -> FastAPI:
    return create_app()


def __getattr__(name: str):
    # `uvicorn service.app:app` builds the app (reading MPRNET_*) when first asked for, not on
    # every import of this module.
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
