"""Which runtime runs the network on a device: PyTorch's :class:`~service.engine.Engine` (the
reference, and the only one on CUDA) or the :class:`~service.openvino_runner.OpenVinoRunner`
converted from it (the CPU default where OpenVINO is installed). Both have the same
``forward``, ``warmup`` and ``describe``, so nothing past this module tells them apart.
"""

from __future__ import annotations

import os

import torch

from models import LoadedCheckpoint

from .engine import Engine
from .openvino_runner import OpenVinoRunner, openvino_available
from .tiling import DEFAULT_TILE_SIZE

__all__ = ["resolve_backend", "build_engine", "BACKENDS"]

BACKENDS = ("auto", "torch", "openvino")


def resolve_backend(wanted: str, device: torch.device, precision: str) -> tuple[str, str | None]:
    """(``torch`` or ``openvino``, why not OpenVINO) for ``wanted`` = auto, torch or openvino.

    ``auto`` takes OpenVINO on the CPU where it is installed and can run the precision asked for;
    an explicit ``openvino`` that cannot run raises ``ValueError`` with the reason.
    """
    if wanted == "torch":
        return "torch", None
    reason = None
    if device.type != "cpu":
        reason = f"the OpenVINO backend runs on the CPU, not {device}"
    elif precision != "fp32":
        reason = f"the OpenVINO backend runs fp32 only, and {precision} was asked for"
    else:
        reason = openvino_available()
    if reason is None:
        return "openvino", None
    if wanted == "openvino":
        raise ValueError(f"backend openvino cannot run here: {reason}")
    return "torch", reason


def build_engine(checkpoint: LoadedCheckpoint, model: torch.nn.Module, backend: str, *, device: torch.device,
                 precision: str, tile_size: int, max_batch_size: int | None, channels_last: bool = True,
                 compile: bool = False, cuda_graphs: bool | None = None, allow_emulated_precision: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> Engine | OpenVinoRunner:
    """``model`` (the checkpoint's network, or a copy of it for another device) on ``backend``."""
    if backend == "openvino":
        return OpenVinoRunner(model, weights_sha256=checkpoint.sha256, config=checkpoint.config,
                              tile_size=tile_size or DEFAULT_TILE_SIZE, max_batch_size=max_batch_size or 1,
                              cache_dir=cache_dir)
    return Engine(model, config=checkpoint.config, device=device, precision=precision, tile_size=tile_size,
                  max_batch_size=max_batch_size, channels_last=channels_last, compile=compile,
                  cuda_graphs=cuda_graphs, allow_emulated_precision=allow_emulated_precision)
