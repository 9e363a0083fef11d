"""MPRNet network, checkpoints and bundled weights; nothing here knows about HTTP or training."""

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
