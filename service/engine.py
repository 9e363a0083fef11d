"""The device engine: one MPRNet on one device runs batches of equal tiles.

:meth:`Engine.forward` is the whole job: an (N, 3, h, w) float32 batch in [0, 1] in, stage 3
clamped to [0, 1] out. The engine also prepares itself for the serving tile shape (warm-up,
compilation, CUDA graphs) and can measure how large tiles and batches fit in device memory.
Cutting images into tiles and blending them back is :mod:`service.tiling`'s job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time

import numpy as np
import torch

from models import MPRNetConfig, load_checkpoint

from .devices import emulated_precision_problem, resolve_device, resolve_devices
from .tiling import DEFAULT_TILE_SIZE, check_tiling

__all__ = ["Engine", "PRECISIONS", "default_batch_size", "emulated_precision_problem", "is_out_of_memory",
           "resolve_device", "resolve_devices"]

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# On the CPU a batch of 512 px tiles runs slower per pixel than one tile at a time (its activations
# outgrow the caches: 0.25 vs 0.18 MP/s at batch 1 vs 4 on this project's 2-core VM, BENCHMARKS.md),
# so there tiles go one by one; a GPU needs batches to fill. 16 on CUDA is the configuration measured
# on an H200 (BENCHMARKS.md, GPU goals): 32 clients of 512x512 uploads filled batches of 9-16 tiles on average.
_DEFAULT_BATCH_SIZES = {"cuda": 16, "cpu": 1}


def default_batch_size(device: str | torch.device) -> int:
    """Tiles per forward pass when none is configured: 16 on CUDA, 1 on the CPU."""
    return _DEFAULT_BATCH_SIZES.get(torch.device(device).type, 1)

# Auto sizing on CUDA: tile sides tried, largest first (bigger tiles re-compute less overlap), the
# fewest tiles a batch must hold at the chosen side (batching is where a GPU's throughput comes
# from), the batch ceiling, and the share of free memory activations may take (the rest is slack
# for cuDNN workspaces and allocator fragmentation).
_AUTO_TILE_SIDES = (1024, 768, 512, 384, 256)
_AUTO_MIN_BATCH = 4
_AUTO_MAX_BATCH = 64
_AUTO_MEMORY_FRACTION = 0.6

# Batch shapes compiled by all engines of this process. Dynamo keeps at most recompile_limit (8 by
# default) graphs per code object, and every engine runs the same MPRNet.forward: three tasks of five
# shapes would pass it, the shapes past it running eagerly after one warning. So the limits are raised
# to the count (older torch names them cache_size_limit and accumulated_cache_size_limit).
_compiled_batch_shapes = 0


def _allow_compiled_shapes(count: int) -> None:
    global _compiled_batch_shapes
    _compiled_batch_shapes += count
    import torch._dynamo

    config = torch._dynamo.config
    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next((name for name in names if hasattr(config, name)), None)
        if name is not None:
            setattr(config, name, max(getattr(config, name), _compiled_batch_shapes))


def _dynamo_graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]  # every engine's, every shape's, so far


# One side stream, graph memory pool and lock per CUDA device, shared by every engine on it (all
# tasks, and a device's second worker): warm-up captures one engine at a time and replays are
# serialised, so the device's graphs take the memory of its largest one rather than one pool per task.
@functools.cache
def _graph_resources(index: int) -> tuple[torch.cuda.Stream, tuple, threading.RLock]:
    return torch.cuda.Stream(torch.device("cuda", index)), torch.cuda.graph_pool_handle(), threading.RLock()


def is_out_of_memory(error: BaseException) -> bool:
    """A device allocation failure, as opposed to a real fault of the model or its input."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


class Engine:
    """One MPRNet on one device, with its precision and the tile shape it is prepared for.

    Args:
        model: an MPRNet (e.g. ``models.load_checkpoint(path).model``).
        config: its constructor values, reported by :meth:`describe`.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, or ``fp16``/``bf16`` autocast; fp16 needs CUDA, bf16 also runs on
            CPUs that have bf16 instructions (AVX512-BF16, AMX) and on CUDA from compute capability 8.0.
        tile_size: the serving tile side, which :meth:`warmup`, compilation and CUDA graphs
            prepare for; 0 when images run whole.
        max_batch_size: most tiles :meth:`forward` will be given at once; :meth:`warmup` prepares
            every batch shape up to it. ``None``: :func:`default_batch_size` for the device.
        channels_last: keep weights and activations in NHWC, the layout oneDNN's CPU convolutions
            and cuDNN's tensor-core ones read without transposing: it halves the bundled network's
            time on the CPU, and served 1.68x the images per second of NCHW on an H200 (eager;
            BENCHMARKS.md).
        compile: ``torch.compile`` the network for the serving tile shape (compiled in :meth:`warmup`).
        cuda_graphs: replay one captured CUDA graph per batch shape of the serving tile; a batch
            size whose capture fails runs eagerly from then on. ``None`` (the default): on for CUDA
            unless ``compile`` is, since the bundled network is bound by kernel launches there and
            graphs served 3.7x the images per second of eager on an H200 (bf16; BENCHMARKS.md); there is
            nothing to capture on the CPU.
        allow_emulated_precision: run a precision this device has no instructions for (bf16 on a
            CPU without AVX512-BF16 or AMX), with a warning, instead of raising ``ValueError``.

    A forward pass that runs out of device memory is split in halves and retried, down to single
    tiles, so callers see only success or a real failure.
    """

    def __init__(self, model: torch.nn.Module, *, config: MPRNetConfig | None = None,
                 device: str | torch.device = "auto", precision: str = "fp32", tile_size: int = DEFAULT_TILE_SIZE,
                 max_batch_size: int | None = None, channels_last: bool = True, compile: bool = False,
                 cuda_graphs: bool | None = None, allow_emulated_precision: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if max_batch_size is None:
            max_batch_size = default_batch_size(self.device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"precision fp16 needs a CUDA device; use fp32 or bf16 on {self.device}")
        emulated = emulated_precision_problem(precision, self.device)
        if emulated is not None:
            if not allow_emulated_precision:
                raise ValueError(f"precision {precision} on {self.device}: {emulated}. Use fp32, or run it anyway "
                                 f"with --allow-emulated-precision (serve also reads "
                                 f"MPRNET_ALLOW_EMULATED_PRECISION=1)")
            log.warning("precision %s on %s runs emulated, as allowed: %s", precision, self.device, emulated)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device; {self.device} has no graphs to capture")
        if cuda_graphs is None:
            # Graphs over compiled code were not measured; compile alone was (1.9x eager at batch 1, graphs 3.2x).
            cuda_graphs = self.device.type == "cuda" and not compile
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        check_tiling(tile_size, 0)
        self.config = config
        self.precision = precision
        self.tile_size = tile_size
        self.max_batch_size = max_batch_size
        self.channels_last = channels_last
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.oom_splits = 0  # batches halved after running out of memory, for logs and tests
        self.bytes_per_pixel: float | None = None  # activation memory, measured by choose_sizes on CUDA
        # Both layouts set explicitly: Module.to works in place, so a model may arrive converted.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=layout).eval().requires_grad_(False)
        self._on_cuda = self.device.type == "cuda"
        if self._on_cuda:
            # The serving tile shape is fixed, so cuDNN's per-shape autotuning pays for itself, once
            # per batch shape at warm-up: the serving tile's batches are padded to batch_shapes().
            torch.backends.cudnn.benchmark = True
        # Padding costs the padded tiles' compute: worth it where each batch shape is prepared (cuDNN's
        # autotuning, a compilation, a graph), not for the CPU's eager passes, which prepare nothing.
        self._pads_batches = self._on_cuda or compile or cuda_graphs
        # The network as the fast path runs it, for the serving tile shape only; other shapes (a
        # small image's single tile) go through the plain model rather than recompiling or capturing.
        self._fast_model = torch.compile(self.model, dynamic=False) if compile else self.model
        if compile:
            _allow_compiled_shapes(len(self.batch_shapes()))
        self.compiled_graphs = 0  # graphs Dynamo compiled in this engine's forward passes, for logs and tests
        self._warmed_up = False
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._failed_captures: dict[int, torch.cuda.CUDAGraph] = {}  # batch sizes that run eagerly for good
        if cuda_graphs:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._capture_stream, self._graph_pool, self._graph_lock = _graph_resources(index)

    @classmethod
    def from_checkpoint(cls, path, **options) -> Engine:
        """An engine for the MPRNet in a checkpoint file (any width, inferred from its shapes)."""
        loaded = load_checkpoint(path)
        return cls(loaded.model, config=loaded.config, **options)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    @property
    def serving_shape(self) -> tuple[int, int, int] | None:
        """The tile shape the fast path (compile, graphs) is prepared for; None when untiled."""
        return (3, self.tile_size, self.tile_size) if self.tile_size else None

    def batch_shapes(self) -> list[int]:
        """Batch sizes the fast path is prepared for: powers of two up to the largest, and it.

        A batch is padded up to the next of these, so that compilation and graph capture happen
        a handful of times at warm-up instead of once per size under load.
        """
        sizes = {1 << k for k in range(self.max_batch_size.bit_length()) if 1 << k <= self.max_batch_size}
        return sorted(sizes | {self.max_batch_size})

    @torch.inference_mode()
    def forward(self, tiles: np.ndarray) -> np.ndarray:
        """One batch of equal (N, 3, h, w) tiles through the network; stage 3, clamped to [0, 1].

        Out of device memory, the batch is halved and each half retried, down to single tiles.
        """
        try:
            return self._forward_once(tiles)
        except Exception as error:  # re-raised below unless it is an allocation failure
            if len(tiles) <= 1 or not is_out_of_memory(error):
                raise
        # Retried outside the except block, so the failed attempt's frames and tensors are freed first.
        self.oom_splits += 1
        log.warning("out of memory on %s with a batch of %d tiles; retrying in halves", self.device, len(tiles))
        if self._on_cuda:
            torch.cuda.empty_cache()
        half = len(tiles) // 2
        return np.concatenate([self.forward(tiles[:half]), self.forward(tiles[half:])])

    def _forward_once(self, tiles: np.ndarray) -> np.ndarray:
        count = len(tiles)
        host = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        serving = tuple(host.shape[1:]) == self.serving_shape
        if serving and self._pads_batches and count < self.max_batch_size:
            padded = next(size for size in self.batch_shapes() if size >= count)
            host = torch.cat([host, host[-1:].expand(padded - count, *host.shape[1:])])
        # A batch over max_batch_size (a caller's own batching) runs eagerly rather than compiling
        # or capturing once more for a shape warm-up did not prepare.
        fast = serving and (self.compile or self.cuda_graphs) and len(host) <= self.max_batch_size
        if self._on_cuda:
            # Page-locked memory lets the copy run by DMA, overlapping whatever the stream is doing.
            host = host.pin_memory()
        batch = host.to(self.device, non_blocking=True)
        restored = self._replay(batch) if fast and self.cuda_graphs else None
        if restored is None:
            restored = self._run_fast(batch) if fast else self._run(self.model, batch)
        restored = restored[:count]
        if not self._on_cuda:
            return restored.contiguous().numpy()
        out = torch.empty(restored.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(restored, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return out.numpy()

    def _run(self, network, batch: torch.Tensor) -> torch.Tensor:
        """The network's stage 3, clamped, in float32: the whole of a forward pass on the device."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32"):
            restored = network(batch)[0]
        return restored.float().clamp_(0, 1)

    def _run_fast(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.compile:
            return self._run(self._fast_model, batch)
        # Dynamo recompiles silently when a guard fails; after warm-up that stalls a request, so it is logged.
        before = _dynamo_graphs_compiled()
        restored = self._run(self._fast_model, batch)
        compiled = _dynamo_graphs_compiled() - before
        self.compiled_graphs += compiled
        if compiled and self._warmed_up:
            log.warning("torch.compile compiled %d graph(s) on %s for a batch of shape %s after warm-up; "
                        "set TORCH_LOGS=recompiles for the reason", compiled, self.device, tuple(batch.shape))
        return restored

    def _graph_for(self, batch_size: int):
        """The graph for ``batch_size`` tiles, captured now if need be; None once its capture failed."""
        if batch_size in self._graphs or batch_size in self._failed_captures:
            return self._graphs.get(batch_size)
        graph = torch.cuda.CUDAGraph()
        try:
            self._graphs[batch_size] = self._capture(graph, batch_size)
            return self._graphs[batch_size]
        except Exception as error:  # whatever broke the capture, eager still serves this batch size
            failure = f"{type(error).__name__}: {error}"
        # Cleaned up outside the except block, so that the failed attempt's tensors are freed first.
        with torch.cuda.device(self.device), torch.cuda.stream(self._capture_stream):
            if torch.cuda.is_current_stream_capturing():  # work queued now would join a dead graph
                with contextlib.suppress(RuntimeError):  # an invalidated capture ends with an error
                    graph.capture_end()
            # A capture failing at its end raises before the allocator stops routing to the pool (and
            # refers to the graph, hence kept in _failed_captures). Private, older torch's name second.
            stop_routing = (getattr(torch._C, "_cuda_endAllocateToPool", None)
                            or getattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", None))
            with contextlib.suppress(Exception):  # it raises when the capture let go already
                stop_routing(torch.cuda.current_device(), self._graph_pool)
        # Its eager passes may still be reading the static input, freed with the attempt's frames.
        self._capture_stream.synchronize()
        torch.cuda.empty_cache()
        self._failed_captures[batch_size] = graph
        log.warning("capturing a CUDA graph for batches of %d tiles on %s failed, so they run eagerly from now on: %s",
                    batch_size, self.device, failure)
        return None

    def _capture(self, graph: torch.cuda.CUDAGraph, batch_size: int):
        with torch.cuda.device(self.device):
            caller, side = torch.cuda.current_stream(self.device), self._capture_stream
            static_in = torch.rand(batch_size, *self.serving_shape, device=self.device)
            # Capture needs its allocations made, and cuDNN's algorithms chosen, on the side stream first.
            side.wait_stream(caller)
            # Its own stream context too: a capture failing at its end skips torch.cuda.graph's restore.
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._run_fast(static_in)
                with torch.cuda.graph(graph, pool=self._graph_pool, stream=side):
                    static_out = self._run_fast(static_in)
            caller.wait_stream(side)
        return graph, static_in, static_out

    def _replay(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The batch through its captured graph (captured now if need be); None when its capture failed."""
        # The device's graphs share a pool, so no two may run at once, and a replay may overwrite
        # another graph's output: it is cloned before the lock is let go. Capturing is under the
        # lock too, since two captures at once are refused.
        with self._graph_lock, torch.cuda.device(self.device):
            captured = self._graph_for(len(batch))
            if captured is None:
                return None
            graph, static_in, static_out = captured
            static_in.copy_(batch)
            graph.replay()
            return static_out.clone()

    def choose_sizes(self) -> tuple[int, int]:
        """(tile side, batch size) that fit in this device's free memory; the defaults on the CPU.

        A pass of a 256x256 tile measures the activation memory per pixel at this precision and
        layout (kept as ``bytes_per_pixel``): the second pass, since the first one also holds cuDNN's
        autotuning workspaces. The budget is a share of free memory plus what the allocator already
        holds unused (the engines of all tasks on a device run one batch at a time and reuse it).
        The largest tile side whose batch of 4 fits is chosen, and the batch is as many of those
        tiles as fit, up to 64.
        """
        if not self._on_cuda:
            return DEFAULT_TILE_SIZE, default_batch_size(self.device)
        probe = torch.rand(1, 3, 256, 256, device=self.device)
        with torch.inference_mode():
            self._run(self.model, probe)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            self._run(self.model, probe)
        torch.cuda.synchronize(self.device)
        per_pixel = self.bytes_per_pixel = (torch.cuda.max_memory_allocated(self.device) - before) / probe[0, 0].numel()
        free, _ = torch.cuda.mem_get_info(self.device)
        held_unused = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = _AUTO_MEMORY_FRACTION * (free + held_unused)
        side = next((s for s in _AUTO_TILE_SIDES if _AUTO_MIN_BATCH * s * s * per_pixel <= budget),
                    _AUTO_TILE_SIDES[-1])
        batch = max(1, min(_AUTO_MAX_BATCH, math.floor(budget / (side * side * per_pixel))))
        log.info("auto sizing on %s: %.0f bytes per pixel, %.1f GiB budget -> tile %d, batch %d",
                 self.device, per_pixel, budget / 2**30, side, batch)
        return side, batch

    def warmup(self, batch_size: int = 1) -> None:
        """Forward passes of the serving tile shape, so no request pays for first-call setup.

        On CUDA, and with compile on, every batch shape the serving tile is padded to runs now
        (cuDNN autotunes, Dynamo compiles, graphs are captured); elsewhere one batch of ``batch_size``.
        """
        side = self.tile_size or 256
        sizes = self.batch_shapes() if self._pads_batches and self.tile_size else [batch_size]
        compiled_before, started = self.compiled_graphs, time.perf_counter()
        # Largest first: smaller graphs then fit in the memory the largest left in the shared pool.
        for size in sorted(sizes, reverse=True):
            self.forward(np.random.default_rng(size).random((size, 3, side, side), dtype=np.float32))
        if self._on_cuda:
            torch.cuda.synchronize(self.device)
        if self.compile:
            log.info("warm-up on %s compiled %d graph(s) for batch shapes %s in %.1f s", self.device,
                     self.compiled_graphs - compiled_before, sizes, time.perf_counter() - started)
        self._warmed_up = True

    def describe(self) -> dict:
        return {
            "backend": "torch",
            "architecture": self.config.as_kwargs() if self.config else None,
            "parameters": self.parameter_count,
            "device": str(self.device),
            "precision": self.precision,
            "tile_size": self.tile_size,
            "max_batch_size": self.max_batch_size,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
        }
