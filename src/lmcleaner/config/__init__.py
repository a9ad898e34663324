"""Typed config schema, YAML presets and Hydra-style overrides."""

from .loader import ConfigError, available_presets, load_config, register_with_hydra, to_dict, validate
from .schema import (
    LoraConfig,
    ModelConfig,
    RootConfig,
    TrainingConfig,
    TrainingLoggerConfig,
    UnlearnConfig,
    UnlearnTrainerConfig,
)

__all__ = [
    "ConfigError", "available_presets", "load_config", "register_with_hydra", "to_dict", "validate",
    "LoraConfig", "ModelConfig", "RootConfig", "TrainingConfig", "TrainingLoggerConfig",
    "UnlearnConfig", "UnlearnTrainerConfig",
]
