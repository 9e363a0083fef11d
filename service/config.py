"""The service's settings: one object, read from ``MPRNET_*`` environment variables, overridden
by command-line flags, validated once at start-up and printed there.

Every field is also a ``serve`` flag (``tile_size`` -> ``--tile-size``), generated from the field
list below so that a new setting cannot be forgotten on one side.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .decoding import available_cpus
from .imaging import LARGEST_DECODABLE_PIXELS
from .tiling import DEFAULT_TILE_OVERLAP, DEFAULT_TILE_SIZE, check_tiling, count_tiles

__all__ = ["Settings", "add_serve_arguments", "default_model_cache_dir", "default_queued_tiles", "settings_from_args"]

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_ORIGIN = re.compile(r"https?://([^/\s:?#\[\]]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _known_tasks() -> tuple[str, ...]:
    from models.weights import TASKS
    return TASKS


def default_model_cache_dir() -> Path:
    """Where converted models are kept unless configured: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mprnet-service"


def default_queued_tiles(max_pixels: int, tile_size: int, tile_overlap: int) -> int:
    """Room for two images at the pixel limit: the largest upload the service accepts must fit,
    and one such image should not shut out every other request."""
    side = math.isqrt(max_pixels)
    return max(64, 2 * count_tiles(side, side, tile_size, tile_overlap))


class Settings(BaseSettings):
    """What to serve and how; see each field's description (also shown by ``serve --help``)."""

    # No setting means "forever": an infinite timeout broke every restore or readiness, silently.
    model_config = SettingsConfigDict(env_prefix="MPRNET_", extra="ignore", allow_inf_nan=False)

    tasks: Annotated[tuple[str, ...], NoDecode] = Field(
        default_factory=lambda: _known_tasks(),
        description="comma-separated tasks to load and serve (deblurring, denoising, deraining)")
    weights_deblurring: Path | None = Field(
        default=None, description="checkpoint for deblurring (default: the bundled or downloaded weights)")
    weights_denoising: Path | None = Field(
        default=None, description="checkpoint for denoising (default: the bundled or downloaded weights)")
    weights_deraining: Path | None = Field(
        default=None, description="checkpoint for deraining (default: the bundled or downloaded weights)")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    devices: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        default=None, description="comma-separated devices, one inference worker each, sharing one queue "
                                  "(cuda:0,cuda:1; a device named twice gets two workers), or all (every "
                                  "visible GPU, else the CPU); default: the one device above")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="fp32, or fp16/bf16 autocast (fp16 on CUDA only; bf16 on the CPU is "
                                    "fast only where it has bf16 instructions)")
    tile_size: int = Field(default=DEFAULT_TILE_SIZE, ge=0,
                           description="tile side in pixels, a multiple of 8; 0 runs whole images")
    tile_overlap: int = Field(default=DEFAULT_TILE_OVERLAP, ge=0,
                              description="pixels neighbouring tiles share, under half a tile")
    max_batch_size: int | None = Field(
        default=None, ge=1, le=1024, description="most tiles in one forward pass (default: 16 on CUDA; 1 on the CPU, "
                                                 "where bigger batches of 512 px tiles run slower per pixel)")
    max_batch_wait_ms: float = Field(
        default=10.0, ge=0, le=10_000,
        description="longest a batch waits for more tiles after its first one arrived")
    max_queued_tiles: int | None = Field(
        default=None, ge=1, description="queue bound, in tiles; past it requests get 503 with Retry-After "
                                        "(default: room for two images of max_pixels)")
    max_upload_bytes: int = Field(default=32 * 1024 * 1024, ge=1, description="largest accepted request body")
    max_pixels: int = Field(default=4096 * 4096, ge=1, le=LARGEST_DECODABLE_PIXELS,
                            description="largest accepted image, width times height (at most Pillow's "
                                        "ceiling, past which it refuses any image as a decompression bomb)")
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="a request not answered by then gets 504 and its queued tiles are dropped")
    stream_keepalive_s: float = Field(
        default=15.0, gt=0, le=3600,
        description="on an event stream (Accept: text/event-stream), longest silence before a keep-alive comment, "
                    "so that idle proxies do not cut a queued restore")
    max_inflight_bytes: int | None = Field(
        default=None, ge=1, description="upload bytes all requests in flight may hold together, counted as they "
                                        "arrive; past it, 503, before the body is read when its declared size "
                                        "does not fit (default: four uploads of max_upload_bytes)")
    max_inflight_pixels: int | None = Field(
        default=None, ge=1, description="image pixels all requests in flight may hold together (about 50 bytes "
                                        "each); past it, 503 (default: two images of max_pixels)")
    decode_workers: int | None = Field(
        default=None, ge=1, description="decoder processes (default: the CPUs this process may use, from its "
                                        "cgroup quota, at most 4)")
    decode_timeout_s: float = Field(
        # The wait on the decoder's pipe takes at most about 24 days; no decode needs an hour.
        default=10.0, gt=0, le=3600, description="longest one image may take to decode; past it the decode is "
                                                 "stopped and the request gets 422 image_too_complex")
    graceful_shutdown_s: float = Field(
        default=30.0, ge=0, description="after SIGTERM, how long in-flight requests get to finish; an upload "
                                        "still arriving or a restore still running a second before the end "
                                        "is answered 503 not_ready")
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="critical, error, warning, info or debug")
    api_key_hashes: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), exclude=True,  # kept out of the start-up log: a weak key's hash can be guessed back
        description="comma-separated sha256 hex digests of the accepted API keys; empty: no keys needed")
    protect_health: bool = Field(default=False, description="require an API key for /healthz and /readyz too")
    protect_metrics: bool = Field(default=False, description="require an API key for /metrics too")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="comma-separated origins browsers may call from (* for any); empty: CORS off")
    backend: Literal["auto", "torch", "openvino"] = Field(
        default="auto", description="what runs the network: auto (OpenVINO on the CPU where it is installed, "
                                    "PyTorch on CUDA), torch, or openvino (CPU only)")
    model_cache_dir: Path | None = Field(
        default_factory=lambda: default_model_cache_dir(),
        description="where converted and compiled models are kept across restarts (OpenVINO), keyed by weights, "
                    "shape and versions; empty: nowhere")
    channels_last: bool = Field(
        default=True, description="run the network in channels-last (NHWC) memory format (about twice as fast "
                                  "on the CPU, 1.7x on CUDA without graphs)")
    compile: bool = Field(default=False, description="torch.compile the network for the serving tile shape at "
                                                     "start-up (slower start, faster batches)")
    cuda_graphs: bool | None = Field(
        default=None, description="replay captured CUDA graphs for the serving tile shape (default: on for CUDA, "
                                  "where they served 3.7x the images per second in bf16; CUDA only)")
    auto_size: bool = Field(default=False, description="on CUDA, choose tile_size and the batch size (up to "
                                                       "max_batch_size) from free device memory at start-up; "
                                                       "on the CPU the configured values stay")
    limit_concurrency: int | None = Field(
        default=None, ge=1, description="open connections the server serves at once; a request that arrives "
                                        "while more are open (refused ones count until they close) gets a "
                                        "plain-text 503 at once (default: no limit)")
    request_head_timeout_s: float = Field(
        default=20.0, gt=0, description="a request's line and headers must arrive within this many seconds of the "
                                        "connection opening (or of the previous response); past it the connection "
                                        "is closed, with 408 if part of a head had come")
    request_body_min_rate: float = Field(
        default=1024.0, ge=0, description="slowest accepted upload in bytes per second, averaged over each "
                                          "request_body_rate_window_s; a slower body is cut (408, connection "
                                          "closed) and its spooled file removed; 0: no floor")
    request_body_rate_window_s: float = Field(
        default=20.0, gt=0, description="seconds over which request_body_min_rate is averaged: a body that "
                                        "stalls is cut within one to two of these")
    allow_emulated_precision: bool = Field(
        default=False, description="run a precision the device has no instructions for (bf16 on a CPU without "
                                   "AVX512-BF16/AMX: 6x to over 80x slower than fp32) instead of refusing to start")
    worker_stall_timeout_s: float | None = Field(
        default=None, gt=0, description="a forward pass running longer than this turns readiness off until it "
                                        "returns (default: request_timeout_s, past which its requests have all "
                                        "timed out anyway)")
    require_api_keys: bool = Field(
        default=False, description="refuse to start without api_key_hashes, so that a missing key Secret "
                                   "stops the deployment instead of serving without keys")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("api_key_hashes", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("api_key_hashes")
    @classmethod
    def _check_key_hashes(cls, hashes: tuple[str, ...]) -> tuple[str, ...]:
        # Refusing a plain key here stops it from being configured by mistake and never matching.
        for digest in hashes:
            if not _SHA256_HEX.fullmatch(digest):
                # A ValueError would make pydantic quote the input (input_value=...) in the error that
                # start-up prints, and the input is most likely a plaintext key; an error built here
                # carries a placeholder as its input instead.
                raise ValidationError.from_exception_data("Settings", [InitErrorDetails(
                    type=PydanticCustomError(
                        "api_key_not_a_digest",
                        "api_key_hashes takes sha256 hex digests (64 hex digits), not the keys; make one with: "
                        "python -m service.security (the value given is not shown: it may be a key)"),
                    loc=(), input="<not shown>")])
        return tuple(digest.lower() for digest in hashes)

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        # A browser's Origin is scheme://host[:port], nothing after it: "https://app.example/" or a
        # bare host would never match one, and CORS would fail with no word as to why.
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"cors_origins takes origins as browsers send them, scheme://host[:port] with "
                                 f"no path or trailing slash (or *), got {origin!r}")
        return origins

    @field_validator("require_api_keys")
    @classmethod
    def _check_keys_configured(cls, required: bool, info: ValidationInfo) -> bool:
        # Fields are validated in order, so api_key_hashes is in info.data unless it was invalid,
        # in which case its own error is reported and this one would only repeat it.
        if required and "api_key_hashes" in info.data and not info.data["api_key_hashes"]:
            raise ValueError("require_api_keys is set but no API key hashes are configured: set "
                             "MPRNET_API_KEY_HASHES (or --api-key-hashes) to the sha256 digests of the keys; "
                             "the service will not start without them")
        return required

    @field_validator("protect_health", "protect_metrics")
    @classmethod
    def _check_protection_has_keys(cls, protect: bool, info: ValidationInfo) -> bool:
        # Without keys nothing is guarded: an operator who asked for private metrics would be
        # serving them to anyone, believing otherwise.
        if protect and "api_key_hashes" in info.data and not info.data["api_key_hashes"]:
            raise ValueError(f"{info.field_name} is set but no API key hashes are configured, so the endpoint "
                             "would stay open to anyone: set MPRNET_API_KEY_HASHES (or --api-key-hashes), "
                             f"or leave {info.field_name} off")
        return protect

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        known = _known_tasks()
        unknown = [task for task in tasks if task not in known]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        if not tasks:
            raise ValueError(f"at least one task is needed; choose from {', '.join(known)}")
        return tuple(dict.fromkeys(tasks))  # drops repeats, keeps the order given

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not _DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        return device

    @field_validator("devices", mode="before")
    @classmethod
    def _split_devices(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        return value or None  # an empty MPRNET_DEVICES means unset, as for the other settings

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, devices: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if devices is None or devices == ("all",):
            return devices
        bad = [device for device in devices if not _DEVICE_PATTERN.fullmatch(device)]
        if bad:
            raise ValueError(f"devices takes auto, cpu, cuda or cuda:N separated by commas, or all alone; "
                             f"got {', '.join(map(repr, bad))}")
        return devices

    @field_validator("weights_deblurring", "weights_denoising", "weights_deraining", "model_cache_dir",
                     mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: Any) -> Any:
        # An empty value (a template's unset variable) would become Path("."), the working
        # folder: for weights "unset" (the default file), for the model cache "nowhere", as documented.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        # uvicorn binds an empty host to every interface: an unset variable must not publish the service.
        if not host.strip():
            raise ValueError("host is empty; give an address to listen on (127.0.0.1 for this machine only, "
                             "0.0.0.0 for every interface)")
        return host

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_tiles_and_fill_in_queue_bound(self) -> "Settings":
        check_tiling(self.tile_size, self.tile_overlap)
        if self.max_queued_tiles is None:
            self.max_queued_tiles = default_queued_tiles(self.max_pixels, self.tile_size, self.tile_overlap)
        if self.max_batch_size is None:
            self.max_batch_size = self._default_batch_size()
        if self.max_inflight_bytes is None:
            self.max_inflight_bytes = 4 * self.max_upload_bytes
        if self.max_inflight_pixels is None:
            self.max_inflight_pixels = 2 * self.max_pixels
        if self.decode_workers is None:
            self.decode_workers = min(4, available_cpus())
        return self

    def _default_batch_size(self) -> int:
        """The first device's default; read from the names, so a CUDA device that is missing is
        reported when the models load, as before, rather than here."""
        import torch

        from .engine import default_batch_size  # imported late, as _known_tasks is: engine imports models
        first = (self.devices or (self.device,))[0]
        if first in ("auto", "all"):
            first = "cuda" if torch.cuda.is_available() else "cpu"
        return default_batch_size(first)

    def weights_path(self, task: str) -> Path:
        """The checkpoint configured for ``task``, else the default one (which may raise
        ``models.weights.WeightsNotFound`` saying how to get it)."""
        configured = getattr(self, f"weights_{task}", None)
        if configured is not None:
            return configured
        from models.weights import resolve
        return resolve(task)

    def summary(self) -> str:
        """One line per setting, for the start-up log."""
        values = self.model_dump(mode="json")
        values["tasks"] = ",".join(self.tasks)
        values["devices"] = ",".join(self.devices) if self.devices else None
        width = max(map(len, values))
        return "\n".join(f"  {name:<{width}} = {value}" for name, value in values.items())


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; a flag left out keeps the environment's value or the default."""
    group = parser.add_argument_group("service settings (each also read from MPRNET_<NAME>)")
    for name, field in Settings.model_fields.items():
        # Values stay strings here; Settings parses and validates them exactly as it does the
        # environment's, so both paths give the same errors.
        default = field.get_default(call_default_factory=True)
        # A switch given alone turns it on (--compile), as README's tables show it; a value still works.
        switch = {"nargs": "?", "const": "true"} if field.annotation in (bool, bool | None) else {}
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
                           help=f"{field.description} [env MPRNET_{name.upper()}, default {default!r}]", **switch)


def settings_from_args(namespace: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given; raises pydantic's
    ``ValidationError`` naming each bad field."""
    overrides = {name: value for name, value in vars(namespace).items()
                 if name in Settings.model_fields and value is not None}
    return Settings(**overrides)
