"""Typed configuration: the dataclasses behind `conf/` and their registration with Hydra."""

from xgen.config.schema import (
    DataMixConfig,
    HardwareConfig,
    LoaderConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    PrepareConfig,
    RawInputConfig,
    SourceConfig,
    SpikeConfig,
    StageConfig,
    TaskConfig,
    TokenizerConfig,
    TrainerConfig,
    XGenConfig,
)
from xgen.config.store import ConfigError, register_configs, to_object

__all__ = [
    "ConfigError",
    "DataMixConfig",
    "HardwareConfig",
    "LoaderConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PrepareConfig",
    "RawInputConfig",
    "SourceConfig",
    "SpikeConfig",
    "StageConfig",
    "TaskConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "XGenConfig",
    "register_configs",
    "to_object",
]
