"""Typed configuration: the dataclasses behind `conf/` (`schema`), their registration with Hydra (`store`)."""

from xgen.config.errors import ConfigError
from xgen.config.schema import (
    AttentionKernel,
    CarbonConfig,
    ChatTemplateConfig,
    DataMixConfig,
    DType,
    EvalConfig,
    ExecutionConfig,
    GenerateConfig,
    HardwareConfig,
    HFConfig,
    JudgeConfig,
    LoaderConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    Packing,
    Platform,
    PrepareConfig,
    RawInputConfig,
    Remat,
    SamplingConfig,
    SandboxConfig,
    ServeConfig,
    SFTConfig,
    SFTFormat,
    SFTSourceConfig,
    SourceConfig,
    SpikeConfig,
    SpikePolicy,
    StageConfig,
    TaskConfig,
    TokenizerConfig,
    TrainerConfig,
    Truncation,
    XGenConfig,
)


def __getattr__(name: str):
    """Hydra is imported only by what registers or converts configs (`xgen.run`, tests), so
    the model, data and inference packages import their dataclasses without it."""
    if name in ("register_configs", "to_object"):
        from xgen.config import store

        return getattr(store, name)
    raise AttributeError(f"module 'xgen.config' has no attribute {name!r}")

__all__ = [
    "AttentionKernel",
    "Remat",
    "SpikePolicy",
    "DType",
    "Platform",
    "Truncation",
    "Packing",
    "SFTFormat",
    "ExecutionConfig",
    "CarbonConfig",
    "ChatTemplateConfig",
    "GenerateConfig",
    "HFConfig",
    "JudgeConfig",
    "SamplingConfig",
    "SandboxConfig",
    "ServeConfig",
    "SFTConfig",
    "SFTSourceConfig",
    "ConfigError",
    "DataMixConfig",
    "EvalConfig",
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
