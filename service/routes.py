"""The HTTP endpoints: restoring images, and the operations an orchestrator and a scraper use.

Handlers speak HTTP only: they read the upload, watch the deadline and the client, and turn
what :meth:`ServiceState.restore` returns or raises into a response.
"""


import asyncio
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Path, Request, UploadFile
from fastapi.responses import Response

from .config import Settings
from .errors import ErrorBody, ServiceError, as_service_error, not_ready, timed_out
from .event_stream import (
    EventStreamResponse,
    error_event,
    restore_events,
    result_event,
    until_disconnected,
    wants_event_stream,
)
from .metrics import CONTENT_TYPE_LATEST
from .progress import RestoreProgress
from .schemas import ModelsResponse
from .state import Restored, ServiceState, Upload

__all__ = ["restore_router", "operations_router"]

log = logging.getLogger(__name__)


def get_service(request: Request) -> ServiceState:
    return request.app.state.service


Service = Annotated[ServiceState, Depends(get_service)]

_RESTORE_ERRORS = {
    400: "The upload is not a decodable image (`invalid_image`).",
    404: "No such task on this service (`unknown_task`).",
    413: "The upload is over the byte limit (`payload_too_large`), or the image over the pixel limit or "
         "needing more tiles than the queue holds (`image_too_large`).",
    415: "An image format or kind the service does not take (`unsupported_media_type`).",
    422: "The multipart field `image` is missing, not a file, or sent twice (`validation_error`).",
    503: "The queue is full (`queue_full`), the memory budget has no room (`over_capacity`) or the models are not "
         "ready (`not_ready`); see `Retry-After`.",
    504: "The request was not finished within the service's time limit (`timeout`).",
}


def _answer_to(failed: asyncio.Future, request_id: str, timeout_s: float) -> ServiceError:
    error = failed.exception()
    answer = as_service_error(error, timeout_s)
    if answer is None:
        log.error("restoring failed in request %s", request_id, exc_info=error)
        answer = ServiceError(500, "inference_failed", f"the model failed on this image (request {request_id})")
    return answer


def _timings(restored: Restored, started: float) -> dict[str, float]:
    return {**restored.timings, "total": time.monotonic() - started}


def _event_stream(request: Request, service: ServiceState, task: str, work: asyncio.Future,
                  progress: RestoreProgress, deadline: float) -> EventStreamResponse:
    """The answer to a restore that asked for ``text/event-stream``: 200 at once, the outcome in
    its last event (:mod:`service.event_stream`)."""
    entry, request_id, started = request.state.log_entry, request.state.request_id, request.state.started
    timeout_s = service.settings.request_timeout_s
    entry["stream"] = True
    metrics = service.metrics

    def finished(done: asyncio.Future) -> bytes:
        if done.cancelled():  # at the deadline
            answer = timed_out(timeout_s)
        elif done.exception() is not None:
            answer = _answer_to(done, request_id, timeout_s)
        else:
            entry["outcome"] = 200
            restored = done.result()
            return result_event(restored, request_id, _timings(restored, started))
        entry.update(error=answer.code, outcome=answer.status_code)
        return error_event(answer)

    def closed() -> None:
        metrics.streams_open.labels(task).dec()
        if not work.done():  # the client went away before the last event
            work.cancel()
            entry.update(error="client_disconnected", outcome=499)
            metrics.cancelled_by_client.labels(task).inc()

    metrics.streams_open.labels(task).inc()
    events = restore_events(work, progress, deadline, service.settings.stream_keepalive_s, finished)
    return EventStreamResponse(events, on_close=closed)


def restore_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["restore"])

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
            "`queue`, `inference`, `encode` and `total` in milliseconds.\n\n"
            "With `Accept: text/event-stream` the answer is 200 at once and a stream of Server-Sent Events: "
            "`progress` (`{\"done\", \"total\", \"eta_s\"}`, tiles finished, from 0 once the image is cut), "
            "then one `result` (`{\"png_base64\", \"width\", \"height\", \"request_id\", \"timings\"}`, "
            "the same PNG) or one `error` (the usual error body, with the `status` it would have had); comment "
            "lines keep an idle connection open. Closing the stream cancels the restore."),
        responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                     "text/event-stream": {"schema": {"type": "string"}}},
                         "description": "The restored image as PNG, or its progress and result as events."},
                   **{status: {"model": ErrorBody, "description": text} for status, text in _RESTORE_ERRORS.items()}},
    )
    async def restore(
        request: Request,
        service: Service,
        task: Annotated[str, Path(description="which restoration to run",
                                  json_schema_extra={"enum": list(settings.tasks)})],
        image: Annotated[UploadFile, File(description="the image to restore: PNG, JPEG, WebP, BMP or TIFF")],
    ) -> Response:
        # Unknown tasks, oversize bodies and a full queue were refused by AdmissionControl
        # before the upload was read.
        if service.batcher is None or service.load_error is not None:
            raise not_ready(service.not_ready_reason())
        if len((await request.form()).getlist("image")) > 1:
            # Which of several images to restore is not ours to guess.
            raise ServiceError(422, "validation_error", "send exactly one multipart file field named 'image'")
        entry = request.state.log_entry
        entry["task"] = task
        timeout_s = service.settings.request_timeout_s
        deadline = request.state.started + timeout_s
        upload = Upload(await image.read())
        await image.close()  # its spooled copy on disk or in memory is no longer needed
        entry["bytes"] = upload.size

        streaming = wants_event_stream(request.headers.get("accept", ""))
        progress = RestoreProgress() if streaming else None
        work = asyncio.ensure_future(service.restore(task, upload, deadline, entry, progress))
        # Marked as seen even when nobody reads it: a handler cancelled at shutdown never does.
        work.add_done_callback(lambda done: done.cancelled() or done.exception())
        del upload
        if streaming:
            return _event_stream(request, service, task, work, progress, deadline)
        client_gone = asyncio.ensure_future(until_disconnected(request.receive))
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
                service.metrics.cancelled_by_client.labels(task).inc()
                return Response(status_code=499)  # nginx's code for it; only the log ever sees it
            raise timed_out(timeout_s)
        if work.exception() is not None:
            # Raised from a function, so that no local of this frame holds the error: its
            # traceback refers to this frame, and such a cycle would keep the request's arrays
            # alive until the garbage collector happened to run.
            raise _answer_to(work, request.state.request_id, timeout_s) from None
        restored = work.result()
        del work
        timings = _timings(restored, request.state.started)
        server_timing = ", ".join(f"{name};dur={round(seconds * 1000, 2)}" for name, seconds in timings.items())
        return Response(content=restored.png, media_type="image/png", headers={"Server-Timing": server_timing})

    return router


def operations_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    # HEAD is answered by middleware.HeadAsGet, here as on every GET route.
    @router.get("/healthz", summary="Liveness: the process answers HTTP")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: every model loaded and warmed up, not shutting down",
                responses={503: {"model": ErrorBody, "description": "loading, failed to load, or draining"}})
    async def readyz(service: Service) -> dict[str, str]:
        if not service.ready:
            raise not_ready(service.not_ready_reason())
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
