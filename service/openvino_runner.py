"""MPRNet on OpenVINO's CPU runtime, behind the same forward contract as :class:`service.engine.Engine`.

``OpenVinoRunner.forward`` takes an (N, 3, h, w) float32 batch in [0, 1] and returns the network's
stage-3 output clamped to [0, 1], float32, same shape -- what ``Engine.forward`` returns -- so the
service can swap one for the other behind its batching queue. The PyTorch module stays the
reference: the OpenVINO model is converted from it at start-up (or read back from the disk cache)
and a fresh conversion is checked against it on a probe batch before it is used or cached.

Why the route is PyTorch -> ONNX (in memory) -> OpenVINO's ONNX frontend rather than
``openvino.convert_model`` on the module: measured on the bundled weights on this project's 2-core
VM, the ONNX route converts in 8-14 s against 31-39 s for the direct (TorchScript) route, and it
reproduces PyTorch on 8-pixel-high inputs (141 dB PSNR), where the direct route and the
torch.export route give 39-45 dB; images 8 px high or less pad to exactly that. The compiled
networks run equally fast either way.

Shapes: the serving tile (tile_size x tile_size, any batch up to max_batch_size) gets a model
compiled for its static shape, kept in a small LRU cache and prepared by :meth:`warmup`. Every
other shape (images smaller than a tile) runs on one dynamic-shape model, compiled once, so an
odd-sized request never waits for a compile (about a second per shape). Measured with
``python -m bench.backend_bench``, the static model is at most ~5-10% faster at 512x512 and no
faster at 480x480, so a per-shape compile for off-tile sizes would not pay for itself.

Disk cache (``cache_dir``): the converted model (OpenVINO IR) and OpenVINO's compiled blobs are
kept under ``<cache_dir>/openvino-<version>/<weights sha256>/``. The IR sits in a folder whose name
also hashes the tensors themselves, the PyTorch, ONNX and OpenVINO versions and the source of every
module class in the network, so new weights (even under a wrong digest), new code or a new runtime
never reuse a stale conversion; the compiled blobs are keyed by OpenVINO itself on the model's
topology, weights, input shape and compile settings. Nothing is ever deleted: old folders are dead
weight once the weights or the runtime change.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

__all__ = ["OpenVinoRunner", "openvino_available", "CONVERSION_ROUTE"]

log = logging.getLogger(__name__)

CONVERSION_ROUTE = "onnx"
# Bumped whenever what this module puts into the converted graph changes, so old IR is not reused.
_GRAPH_FORMAT = 2  # 2: read by the ONNX frontend directly, without convert_model's transformations
_ONNX_OPSET = 18
# The probe that checks a conversion against PyTorch: batch of 2 and a non-square side, so a
# conversion that baked in the example's batch or shape fails it. 50 dB is the service's agreement
# bound between backends; a faithful fp32 conversion lands near 140 dB.
_PROBE_SHAPE = (2, 3, 16, 24)
_PROBE_MIN_PSNR_DB = 50.0
_DEFAULT_MAX_STATIC_SHAPES = 4
# torch.onnx.export keeps process-wide state while it runs (GLOBALS.in_onnx_export): two runners
# converting at once in one process, as several services or tasks loading side by side do, would
# trip over each other.
_ONNX_EXPORT = threading.Lock()


def openvino_available() -> str | None:
    """None when this backend can run here, else the reason it cannot (for one log line)."""
    try:
        import openvino
    except ImportError as error:
        return f"the openvino package is not installed ({error})"
    try:
        import onnx  # noqa: F401 - torch's ONNX exporter needs it, and the conversion goes through ONNX
    except ImportError as error:
        return f"the onnx package is not installed ({error}); the OpenVINO backend converts through ONNX"
    try:
        devices = openvino.Core().available_devices
    except Exception as error:  # any failure to start the runtime means "not available"
        return f"OpenVINO did not start: {error}"
    if "CPU" not in devices:
        return f"OpenVINO has no CPU device here (devices: {', '.join(devices) or 'none'})"
    return None


class _RestoredImage(torch.nn.Module):
    """Only what the service uses: stage 3, clamped to [0, 1]. Stages 1-2's images are left out of
    the graph (their features still feed stage 3), and the clamp runs inside the compiled model."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.network(tiles)[0].clamp(0, 1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1 / mse))


def _conversion_key(model: torch.nn.Module) -> str:
    """Everything the converted graph depends on: the tensors themselves, the code, the versions.

    The weights are hashed by content rather than trusted by the caller's digest, so a cached
    conversion can be reused without running PyTorch to check it (a first forward pass of PyTorch
    costs seconds of kernel set-up; hashing the bundled network's 63 MB costs a fraction of one).
    """
    import onnx
    import openvino

    digest = hashlib.sha256()
    for part in (torch.__version__, onnx.__version__, openvino.get_version(), str(_GRAPH_FORMAT), str(_ONNX_OPSET)):
        digest.update(part.encode() + b"\0")
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        # contiguous(): the same bytes whether the module arrives channels-last or not.
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    # How its channel attention pools is part of the graph, not of the weights.
    digest.update(f"attention_patch={getattr(model, 'attention_patch', None)}".encode())
    # The network's code: a fix in models/mprnet.py changes the graph while the weights stay the same.
    sources = {inspect.getsourcefile(type(module)) for module in model.modules()}
    sources.add(inspect.getsourcefile(_RestoredImage))
    for source in sorted(path for path in sources if path):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:24]


class OpenVinoRunner:
    """One MPRNet converted to OpenVINO and run on the CPU, fp32.

    Args:
        model: the PyTorch MPRNet (the reference); it is copied, never modified.
        weights_sha256: the weights file's sha256, part of every on-disk cache key.
        config: the network's constructor values (``models.MPRNetConfig``), for :meth:`describe`.
        tile_size: the serving tile side; (N, 3, tile_size, tile_size) batches run on static-shape
            models, everything else on one dynamic-shape model.
        max_batch_size: most tiles per inference; larger batches are run in slices of this size.
        threads: CPU threads OpenVINO uses for one inference.
        cache_dir: where converted models and compiled blobs are kept across restarts; None: nowhere.
        max_static_shapes: how many static-shape compiled models are kept (least recently used
            evicted first).

    Conversion, the check against PyTorch and the dynamic model's compile happen in the
    constructor; :meth:`warmup` compiles the serving tile shape. :meth:`forward` may be called
    from any thread; calls run one at a time.
    """

    def __init__(self, model: torch.nn.Module, *, weights_sha256: str, config=None, tile_size: int = 512,
                 max_batch_size: int = 1, threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 max_static_shapes: int = _DEFAULT_MAX_STATIC_SHAPES):
        import openvino
        import openvino.properties as props
        import openvino.properties.hint as hints

        if not weights_sha256:
            raise ValueError("weights_sha256 is needed to key the on-disk caches")
        if tile_size < 8 or tile_size % 8:
            raise ValueError(f"tile_size must be a positive multiple of 8, got {tile_size}")
        if max_batch_size < 1 or max_static_shapes < 1:
            raise ValueError("max_batch_size and max_static_shapes must be at least 1")
        self._ov = openvino
        self.weights_sha256 = weights_sha256
        self.tile_size = int(tile_size)
        self.max_batch_size = int(max_batch_size)
        self.threads = int(threads or torch.get_num_threads())
        self.max_static_shapes = int(max_static_shapes)
        self.config = config
        self.parameter_count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

        self._core = openvino.Core()
        self._cache_root: Path | None = None
        if cache_dir is not None:
            # The full version string holds slashes ("2026.4.1-22982-...-releases/2026/4").
            version = re.sub(r"[^0-9A-Za-z.+-]+", "_", openvino.get_version())
            self._cache_root = Path(cache_dir) / f"openvino-{version}" / weights_sha256
            try:
                self._cache_root.mkdir(parents=True, exist_ok=True)
                self._core.set_property({props.cache_dir: str(self._cache_root / "compiled")})
            except OSError as error:
                # A read-only filesystem costs start-up time on every start, not the service.
                log.warning("cannot keep converted models in %s (%s); converting at every start", cache_dir, error)
                self._cache_root = None
        # f32 stated outright: on CPUs with bf16 or AMX instructions OpenVINO would otherwise pick
        # bf16 by itself. One stream using all the threads: the service runs one batch at a time.
        self._compile_config = {
            hints.inference_precision: openvino.Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: self.threads,
            # Unpinned: in the service, decoding and encoding of other requests share these cores,
            # and threads pinned to a busy core stall the whole pass (measured: 2 clients ran at
            # 0.35-0.47 images/s pinned, against 1.1 for one client).
            "ENABLE_CPU_PINNING": False,
        }
        self._lock = threading.Lock()
        self._static: OrderedDict[tuple[int, int, int], tuple[object, object]] = OrderedDict()
        # A copy of the cache's keys for readers outside the lock (describe, tests): replaced, never mutated.
        self._static_keys: tuple[tuple[int, int, int], ...] = ()
        self.compile_log: list[dict] = []  # one entry per compile: shape, seconds, loaded from cache

        started = time.perf_counter()
        ir_dir = self._cache_root / f"ir-{_conversion_key(model)}" if self._cache_root else None
        self._model = self._read_cached(ir_dir)
        self.converted_from_cache = self._model is not None
        staged = reference = None
        if self._model is None:
            # A copy, so the caller's module keeps its layout (Engine makes it channels-last in place).
            reference = copy.deepcopy(model).float().to(memory_format=torch.contiguous_format).eval()
            reference.requires_grad_(False)
            self._model = self._convert(reference)
            staged = self._stage(ir_dir)
        self.conversion_seconds = time.perf_counter() - started
        self._dynamic = self._compile((-1, 3, -1, -1))
        # A fresh conversion is checked against PyTorch before it is cached or served; a cached one
        # was checked when it was made, and its key covers the tensors, the code and the versions.
        self.probe_psnr_db = None
        if not self.converted_from_cache:
            self.probe_psnr_db = self._probe_psnr(reference)
            if self.probe_psnr_db < _PROBE_MIN_PSNR_DB:
                if staged:
                    shutil.rmtree(staged, ignore_errors=True)
                raise RuntimeError(f"the OpenVINO model disagrees with PyTorch ({self.probe_psnr_db:.1f} dB < "
                                   f"{_PROBE_MIN_PSNR_DB:.0f} dB on a probe batch); not using it")
            if staged:
                self._publish(staged, ir_dir)
        log.info("OpenVINO %s: MPRNet %s in %.1f s, dynamic-shape model compiled in %.1f s%s",
                 openvino.get_version(),
                 "read from the disk cache" if self.converted_from_cache else "converted via ONNX",
                 self.conversion_seconds, self.compile_log[0]["seconds"],
                 "" if self.probe_psnr_db is None else f", {self.probe_psnr_db:.0f} dB from PyTorch on a probe batch")

    # -- conversion -------------------------------------------------------------------------

    def _read_cached(self, ir_dir: Path | None):
        """The converted model from the disk cache, or None."""
        if ir_dir is None or not (ir_dir / "model.xml").is_file():
            return None
        try:
            return self._core.read_model(ir_dir / "model.xml")
        except RuntimeError as error:
            log.warning("unreadable cached OpenVINO model in %s (%s); converting again", ir_dir, error)
            shutil.rmtree(ir_dir, ignore_errors=True)
            return None

    def _convert(self, reference: torch.nn.Module):
        graph = io.BytesIO()
        # Batch 2 and a non-square side, so nothing shape-dependent is traced as a constant of 1 or
        # of a square; the dynamic axes make N, h and w free in the ONNX graph.
        example = torch.rand(2, 3, 64, 96)
        with warnings.catch_warnings(), torch.no_grad():
            # Expected and harmless: the legacy exporter announces its deprecation, and tracing turns
            # MPRNet's "height and width divisible by 8" check into a constant (forward checks it).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            with _ONNX_EXPORT:
                torch.onnx.export(_RestoredImage(reference), (example,), graph, dynamo=False,
                                  opset_version=_ONNX_OPSET, input_names=["tiles"], output_names=["restored"],
                                  dynamic_axes={"tiles": {0: "n", 2: "h", 3: "w"},
                                                "restored": {0: "n", 2: "h", 3: "w"}})
        graph.seek(0)
        # OpenVINO's ONNX frontend itself, not openvino.convert_model around it: that tool reports
        # every call to Intel's telemetry (Google Analytics) unless the user has opted out, and
        # forked 17 processes to send it at each conversion; the frontend sends nothing, and the
        # compiled network is the same (bit-identical outputs, twenty-third session). The probe
        # below checks what it produces.
        onnx_frontend = self._ov.frontend.FrontEndManager().load_by_framework("onnx")
        return onnx_frontend.convert(onnx_frontend.load(graph))

    def _stage(self, ir_dir: Path | None) -> Path | None:
        """Save the fresh conversion beside its cache folder and switch to the saved copy.

        It is renamed into place only once it has passed the probe (:meth:`_publish`), so no worker
        ever reads an unchecked or half-written model. The saved copy is what this start compiles:
        OpenVINO keys compiled blobs on the model's serialised form, which a save-and-read round
        trip changes, and later starts read the saved copy.
        """
        if ir_dir is None:
            return None
        try:
            staging = Path(tempfile.mkdtemp(prefix=ir_dir.name + ".", dir=ir_dir.parent))
            self._ov.save_model(self._model, staging / "model.xml", compress_to_fp16=False)
            self._model = self._core.read_model(staging / "model.xml")
            return staging
        except (OSError, RuntimeError) as error:
            log.warning("cannot cache the converted model in %s: %s", ir_dir.parent, error)
            return None

    @staticmethod
    def _publish(staged: Path, ir_dir: Path) -> None:
        try:
            os.rename(staged, ir_dir)
        except OSError:
            pass  # another worker published the same conversion first; theirs is as good
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _probe_psnr(self, reference: torch.nn.Module) -> float:
        """How closely the compiled dynamic model follows PyTorch on a fixed random batch."""
        probe = np.random.default_rng(0).random(_PROBE_SHAPE, dtype=np.float32)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(probe))[0].clamp(0, 1).numpy()
        return _psnr(self._infer(self._dynamic, probe), expected)

    # -- compiling --------------------------------------------------------------------------

    def _compile(self, shape: tuple[int, int, int, int]):
        """(compiled model, its infer request) for one input shape; -1 marks a dynamic dimension."""
        model = self._model.clone()
        model.reshape({model.inputs[0]: self._ov.PartialShape(list(shape))})
        started = time.perf_counter()
        compiled = self._core.compile_model(model, "CPU", self._compile_config)
        seconds = time.perf_counter() - started
        from_cache = self._cache_root is not None and bool(compiled.get_property("LOADED_FROM_CACHE"))
        self.compile_log.append({"shape": list(shape), "seconds": round(seconds, 3), "from_cache": from_cache})
        return compiled, compiled.create_infer_request()

    def _static_for(self, batch: int):
        key = (batch, self.tile_size, self.tile_size)
        if key in self._static:
            self._static.move_to_end(key)
        else:
            self._static[key] = self._compile((batch, 3, self.tile_size, self.tile_size))
            while len(self._static) > self.max_static_shapes:
                self._static.popitem(last=False)
        self._static_keys = tuple(self._static)
        return self._static[key]

    @property
    def static_shapes(self) -> list[tuple[int, int, int]]:
        """(N, h, w) of the static-shape models held now, least recently used first."""
        return list(self._static_keys)

    # -- running ----------------------------------------------------------------------------

    @staticmethod
    def _infer(compiled_and_request, tiles: np.ndarray) -> np.ndarray:
        _, request = compiled_and_request
        # Copied in rather than shared: a shared input stays referenced by the request until its
        # next inference, which would keep a finished request's whole tile array alive.
        request.infer({0: tiles}, share_inputs=False)
        # The output tensor is the request's own buffer, overwritten by its next inference.
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def forward(self, tiles: np.ndarray) -> np.ndarray:
        """(N, 3, h, w) float32 in [0, 1] -> stage 3 clamped to [0, 1], float32, same shape."""
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, h, w) batch, got shape {tiles.shape}")
        height, width = tiles.shape[2:]
        if height % 8 or width % 8 or not height or not width:
            raise ValueError(f"MPRNet needs height and width divisible by 8, got {height}x{width}")
        tiles = np.ascontiguousarray(tiles, dtype=np.float32)
        serving = height == width == self.tile_size
        outputs = []
        with self._lock:
            for start in range(0, len(tiles), self.max_batch_size):
                chunk = tiles[start:start + self.max_batch_size]
                model = self._static_for(len(chunk)) if serving else self._dynamic
                outputs.append(self._infer(model, chunk))
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def warmup(self, batch_size: int = 1) -> None:
        """Compile (or load from the disk cache) the serving tile shape and run it once."""
        batch_size = min(batch_size, self.max_batch_size)
        side = self.tile_size
        self.forward(np.random.default_rng(batch_size).random((batch_size, 3, side, side), dtype=np.float32))

    def describe(self) -> dict:
        return {
            "backend": "openvino",
            "openvino_version": self._ov.get_version(),
            "conversion": CONVERSION_ROUTE,
            "architecture": self.config.as_kwargs() if self.config else None,
            "parameters": self.parameter_count,
            "device": "cpu",
            "precision": "fp32",
            "inference_precision": self._dynamic[0].get_property("INFERENCE_PRECISION_HINT").to_string(),
            "threads": self.threads,
            "tile_size": self.tile_size,
            "max_batch_size": self.max_batch_size,
        }
