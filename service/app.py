"""The HTTP service, assembled: ``create_app(settings)`` wires the stages of a request's path.

    upload -> ApiKeyGuard -> AdmissionControl (refuse before reading) -> routes (read the upload)
      -> pipeline.prepare (decode, tiles) -> batching queue -> engines' forward passes
      -> pipeline.finish (stitch, encode PNG) -> response

Nothing is read from module globals, so tests and hosts can run several apps side by side. Also
usable as ``uvicorn service.app:create_app --factory`` or ``uvicorn service.app:app`` (both read
settings from ``MPRNET_*``).

Start-up: the server accepts connections at once and answers ``/healthz``, while the models
load and warm up in the background; ``/readyz`` turns 200 only when every task is warm, so an
orchestrator routes traffic only to instances that can serve it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .config import Settings
from .errors import error_response, install_error_handlers
from .middleware import REQUEST_ID_HEADER, AdmissionControl, HeadAsGet, RequestAccounting
from .routes import operations_router, restore_router
from .security import ApiKeyGuard, SecurityHeaders, document_api_keys
from .state import ServiceState
from .web import content_policies, mount_web

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service as an ASGI app; models load in the background once it starts."""
    settings = settings or Settings()
    service = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("settings:\n%s", settings.summary())
        # Said on its own line, as the key digests are kept out of the summary: an operator can see
        # at a glance whether a Secret that should hold keys reached the process.
        if settings.api_key_hashes:
            log.info("API keys: on, %d accepted", len(settings.api_key_hashes))
        else:
            log.warning("API keys: off, anyone who can reach this service can use it")
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
        # /docs is served by mount_web from packaged files; FastAPI's own would load Swagger UI
        # (and ReDoc) from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    install_error_handlers(app)
    # Added innermost first. Outermost, SecurityHeaders marks every answer; inside it CORS answers
    # preflights; RequestAccounting then logs and counts everything inside it, the 401s of the key
    # guard and the refusals of AdmissionControl.
    app.add_middleware(HeadAsGet)
    app.add_middleware(AdmissionControl, tasks=settings.tasks, max_upload_bytes=settings.max_upload_bytes,
                       budget=service.budget, queue_refusal=service.queue_refusal)
    # Outside admission: its refusals tell the task list, the upload limit and the queue state,
    # which a caller without a key must not learn.
    app.add_middleware(ApiKeyGuard, key_hashes=settings.api_key_hashes, protect_health=settings.protect_health,
                       protect_metrics=settings.protect_metrics, error_response=error_response)
    app.add_middleware(RequestAccounting, metrics=service.metrics, tasks=settings.tasks)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", REQUEST_ID_HEADER],
                           expose_headers=[REQUEST_ID_HEADER, "Server-Timing", "Retry-After"])
    page_policies, prefix_policies = content_policies(app)
    app.add_middleware(SecurityHeaders, policies=page_policies, prefixes=prefix_policies)
    app.include_router(restore_router(settings))
    app.include_router(operations_router())
    mount_web(app)
    if settings.api_key_hashes:
        _document_api_keys(app, settings)
    return app


def _document_api_keys(app: FastAPI, settings: Settings) -> None:
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:  # built once, as FastAPI's own is
            app.openapi_schema = document_api_keys(plain(), protect_health=settings.protect_health,
                                                   protect_metrics=settings.protect_metrics)
        return app.openapi_schema

    app.openapi = openapi


@functools.cache
def _app_from_environment() -> FastAPI:
    return create_app()


def __getattr__(name: str):
    # `uvicorn service.app:app` builds the app (reading MPRNET_*) when first asked for, not on
    # every import of this module.
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
