"""Running the app under uvicorn, with the shutdown an orchestrator expects.

Clients too slow to send a request head or its body are cut (:mod:`service.slow_clients`).
SIGTERM (or Ctrl-C): readiness turns false, the listening socket closes, requests in flight get
``graceful_shutdown_s`` to finish, the batching queue drains, and the process exits 0. Models
that fail to load make the process exit 1 instead of idling unready; missing weights, or a
precision the device would only emulate, exit 2 before the port is bound.
"""

from __future__ import annotations

import functools
import logging
import signal
import stat
import threading
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from .app import create_app
from .config import Settings
from .slow_clients import SHUTDOWN_CUT_MARGIN_S, SlowClientLimits, SlowClientProtocol

__all__ = ["serve", "uvicorn_config"]

log = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit_signal):
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig, frame) -> None:
        self._on_exit_signal()
        super().handle_exit(sig, frame)


def configure_logging(level: str) -> None:
    # Everything, uvicorn's own lines included, through one root handler and one format; the
    # per-request lines carry their fields as JSON in the message.
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _check_weights(settings: Settings) -> None:
    """Fail before binding the port when a task has no weights file at all."""
    for task in settings.tasks:
        try:
            path = settings.weights_path(task)
        except LookupError as exc:
            log.error("cannot serve %s: %s", task, exc)
            raise SystemExit(2) from None
        problem = _not_a_readable_file(path)
        if problem:
            log.error("cannot serve %s: weights file %s %s", task, path, problem)
            raise SystemExit(2)


def _not_a_readable_file(path: Path) -> str | None:
    """What keeps ``path`` from being read as a file (missing, a folder, a FIFO that would block
    the start, a symlink loop), or None."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        return "does not exist" if isinstance(error, FileNotFoundError) else f"cannot be read ({error.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a checkpoint file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe, socket or device)"
    return None


def _check_precision(settings: Settings) -> None:
    """Fail before binding the port when the precision would run emulated and that is not allowed."""
    from .engine import emulated_precision_problem, resolve_devices  # torch and the models, only when serving

    try:
        devices = resolve_devices(settings.devices or (settings.device,))
    except ValueError:
        return  # a missing CUDA device is reported when the models load, as before
    for device in dict.fromkeys(devices):
        problem = emulated_precision_problem(settings.precision, device)
        if problem is None:
            continue
        if settings.allow_emulated_precision:
            log.warning("precision %s on %s runs emulated, as allowed: %s", settings.precision, device, problem)
            continue
        log.error("cannot serve with precision %s on %s: %s. Use --precision fp32, or allow it anyway with "
                  "--allow-emulated-precision (MPRNET_ALLOW_EMULATED_PRECISION=1)", settings.precision, device, problem)
        raise SystemExit(2)


def uvicorn_config(settings: Settings, app: ASGIApp) -> uvicorn.Config:
    """How ``serve`` runs ``app``: address, shutdown grace, connection limits and the slow-client
    cut (a deadline on request heads, a floor on body rates). Tests start servers from it too."""
    limits = SlowClientLimits(head_timeout_s=settings.request_head_timeout_s,
                              body_min_rate=settings.request_body_min_rate,
                              body_rate_window_s=settings.request_body_rate_window_s)
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          log_config=None, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=settings.graceful_shutdown_s,
                          # Past this many connections uvicorn answers 503 without running the
                          # app, so a flood of idle or slow clients cannot pile up. Its count
                          # includes the connection asking, so a limit of N would serve N - 1.
                          limit_concurrency=None if settings.limit_concurrency is None
                          else settings.limit_concurrency + 1,
                          http=functools.partial(SlowClientProtocol, limits=limits))


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return; ``SystemExit`` (1 or 2) if models cannot load."""
    configure_logging(settings.log_level)
    _check_weights(settings)
    _check_precision(settings)
    app = create_app(settings)
    service = app.state.service
    config = uvicorn_config(settings, app)

    def begin_draining() -> None:
        if not service.draining:
            log.info("shutting down: readiness off, draining requests in flight (up to %g s)",
                     settings.graceful_shutdown_s)
        # Restores still running then are answered 503 before uvicorn cancels what is left, as
        # uploads still arriving are (service.slow_clients).
        service.begin_draining(settings.graceful_shutdown_s - SHUTDOWN_CUT_MARGIN_S)

    server = _DrainingServer(config, on_exit_signal=begin_draining)
    service.on_load_failure = lambda: setattr(server, "should_exit", True)
    if threading.current_thread() is threading.main_thread():
        # After its graceful shutdown uvicorn re-raises the signal it caught. With no handler
        # that would kill the process with status 143; a drained SIGTERM is a clean stop.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if service.load_error is not None:
        raise SystemExit(1)
    log.info("stopped")
