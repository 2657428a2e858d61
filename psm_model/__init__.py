"""HRNet-PSM pose model: torch only, importable and testable without Ray."""

from psm_model.config import Config, ConfigError, ModelConfig, load_config
from psm_model.decode import decode_heatmaps
from psm_model.hrnet import PoseHRNet, build_model
from psm_model.weights import CheckpointError, LoadReport, from_official_checkpoint, load_pretrained

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "LoadReport",
    "ModelConfig",
    "PoseHRNet",
    "build_model",
    "decode_heatmaps",
    "from_official_checkpoint",
    "load_config",
    "load_pretrained",
]
