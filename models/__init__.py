"""MPRNet network, checkpoints and bundled weights; nothing here knows about HTTP or training.

The names below load on first use: ``models.weights`` (task names, installing) is read by the
command line before it knows whether it will run a network, and importing PyTorch costs seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import (
        RELEASED_CONFIGS,
        CheckpointError,
        LoadedCheckpoint,
        MPRNetConfig,
        infer_config,
        load_checkpoint,
        load_model,
        load_state_dict,
        save_safetensors,
        sha256_file,
    )
    from .mprnet import MPRNet

__all__ = ["MPRNet", "MPRNetConfig", "CheckpointError", "LoadedCheckpoint", "RELEASED_CONFIGS", "infer_config",
           "load_checkpoint", "load_model", "load_state_dict", "save_safetensors", "sha256_file"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(".mprnet" if name == "MPRNet" else ".checkpoint", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
