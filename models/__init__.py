"""MPRNet network, checkpoints and bundled weights; nothing here knows about HTTP."""

from .checkpoint import (RELEASED_CONFIGS, CheckpointError, MPRNetConfig, infer_config, load_model,
                         load_state_dict, save_safetensors, sha256_file)
from .mprnet import MPRNet

__all__ = ["MPRNet", "MPRNetConfig", "CheckpointError", "RELEASED_CONFIGS", "infer_config", "load_model",
           "load_state_dict", "save_safetensors", "sha256_file"]
