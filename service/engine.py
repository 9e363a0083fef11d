"""The device engine: one MPRNet on one device runs batches of equal tiles.

:meth:`Engine.forward` is the whole job: an (N, 3, h, w) float32 batch in [0, 1] in, stage 3
clamped to [0, 1] out. The engine also prepares itself for the serving tile shape (warm-up,
compilation, CUDA graphs) and can measure how large tiles and batches fit in device memory.
Cutting images into tiles and blending them back is :mod:`service.tiling`'s job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from models import MPRNetConfig, load_checkpoint

from .precision import emulated_precision_problem
from .tiling import DEFAULT_TILE_SIZE, check_tiling

__all__ = ["Engine", "PRECISIONS", "default_batch_size", "emulated_precision_problem", "is_out_of_memory",
           "resolve_device", "resolve_devices"]

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# On the CPU a batch of 512 px tiles runs slower per pixel than one tile at a time (its activations
# outgrow the caches: 0.25 vs 0.18 MP/s at batch 1 vs 4 on this project's 2-core VM, BENCHMARKS.md),
# so there tiles go one by one; a GPU needs batches to fill.
_DEFAULT_BATCH_SIZES = {"cuda": 4, "cpu": 1}


def default_batch_size(device: str | torch.device) -> int:
    """Tiles per forward pass when none is configured: 4 on CUDA, 1 on the CPU."""
    return _DEFAULT_BATCH_SIZES.get(torch.device(device).type, 1)

# Auto sizing on CUDA: tile sides tried, largest first (bigger tiles re-compute less overlap), the
# fewest tiles a batch must hold at the chosen side (batching is where a GPU's throughput comes
# from), the batch ceiling, and the share of free memory activations may take (the rest is slack
# for cuDNN workspaces and allocator fragmentation).
_AUTO_TILE_SIDES = (1024, 768, 512, 384, 256)
_AUTO_MIN_BATCH = 4
_AUTO_MAX_BATCH = 64
_AUTO_MEMORY_FRACTION = 0.6


def is_out_of_memory(error: BaseException) -> bool:
    """A device allocation failure, as opposed to a real fault of the model or its input."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but this machine has no usable CUDA device")
    return resolved


def resolve_devices(devices: Sequence[str]) -> list[torch.device]:
    """Each of ``devices`` resolved, repeats kept; ``["all"]`` is every visible CUDA device, else the CPU."""
    if list(devices) == ["all"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", index) for index in range(count)] or [torch.device("cpu")]
    return [resolve_device(device) for device in devices]


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
            and cuDNN's tensor-core ones read without transposing. ``None`` (the default) turns it
            on for the CPU, where it halves the bundled network's time (see BENCHMARKS.md), and
            leaves it off on CUDA, where it has not been measured yet.
        compile: ``torch.compile`` the network for the serving tile shape (compiled in :meth:`warmup`).
        cuda_graphs: replay one captured CUDA graph per batch shape of the serving tile (CUDA only).
        allow_emulated_precision: run a precision this device has no instructions for (bf16 on a
            CPU without AVX512-BF16 or AMX), with a warning, instead of raising ``ValueError``.

    A forward pass that runs out of device memory is split in halves and retried, down to single
    tiles, so callers see only success or a real failure.
    """

    def __init__(self, model: torch.nn.Module, *, config: MPRNetConfig | None = None,
                 device: str | torch.device = "auto", precision: str = "fp32", tile_size: int = DEFAULT_TILE_SIZE,
                 max_batch_size: int | None = None, channels_last: bool | None = None, compile: bool = False,
                 cuda_graphs: bool = False, allow_emulated_precision: bool = False):
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
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        check_tiling(tile_size, 0)
        self.config = config
        self.precision = precision
        self.tile_size = tile_size
        self.max_batch_size = max_batch_size
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.oom_splits = 0  # batches halved after running out of memory, for logs and tests
        # Both layouts set explicitly: Module.to works in place, so a model may arrive converted.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=layout).eval().requires_grad_(False)
        self._on_cuda = self.device.type == "cuda"
        if self._on_cuda:
            # The serving tile shape is fixed, so cuDNN's per-shape autotuning pays for itself.
            torch.backends.cudnn.benchmark = True
        # The network as the fast path runs it, for the serving tile shape only; other shapes (a
        # small image's single tile) go through the plain model rather than recompiling or capturing.
        self._fast_model = torch.compile(self.model, dynamic=False) if compile else self.model
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

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
        fast = tuple(host.shape[1:]) == self.serving_shape and (self.compile or self.cuda_graphs)
        if fast and count < self.max_batch_size:
            padded = next(size for size in self.batch_shapes() if size >= count)
            host = torch.cat([host, host[-1:].expand(padded - count, *host.shape[1:])])
        if self._on_cuda:
            # Page-locked memory lets the copy run by DMA, overlapping whatever the stream is doing.
            host = host.pin_memory()
        batch = host.to(self.device, non_blocking=True)
        if fast and self.cuda_graphs:
            restored = self._replay(batch)
        else:
            restored = self._run(self._fast_model if fast else self.model, batch)
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

    def _replay(self, batch: torch.Tensor) -> torch.Tensor:
        graph, static_in, static_out = self._graphs.get(len(batch)) or self._capture(len(batch))
        static_in.copy_(batch)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, batch_size: int):
        static_in = torch.rand(batch_size, *self.serving_shape, device=self.device)
        # Capture needs its allocations made, and cuDNN's algorithms chosen, on a side stream first.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(self._fast_model, static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._run(self._fast_model, static_in)
        self._graphs[batch_size] = (graph, static_in, static_out)
        return self._graphs[batch_size]

    def choose_sizes(self) -> tuple[int, int]:
        """(tile side, batch size) that fit in this device's free memory; the defaults on the CPU.

        A pass of a 256x256 tile measures the activation memory per pixel at this precision and
        layout: the second pass, since the first one also holds cuDNN's autotuning workspaces.
        The budget is a share of free memory plus what the allocator already holds unused (the
        engines of all tasks on a device run one batch at a time and reuse it). The largest tile
        side whose batch of 4 fits is chosen, and the batch is as many of those tiles as fit, up
        to 64.
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
        per_pixel = (torch.cuda.max_memory_allocated(self.device) - before) / probe[0, 0].numel()
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

        With compile or CUDA graphs on, every prepared batch shape is compiled or captured now.
        """
        side = self.tile_size or 256
        sizes = self.batch_shapes() if (self.compile or self.cuda_graphs) and self.tile_size else [batch_size]
        for size in sizes:
            self.forward(np.random.default_rng(size).random((size, 3, side, side), dtype=np.float32))
        if self._on_cuda:
            torch.cuda.synchronize(self.device)

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
