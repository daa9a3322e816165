"""Typed configuration: the dataclasses behind `conf/` (`schema`), their registration with Hydra (`store`)."""

from xgen.config.errors import ConfigError
from xgen.config.schema import (
    AttentionKernel,
    CarbonConfig,
    ChatTemplateConfig,
    DataMixConfig,
    EvalConfig,
    GenerateConfig,
    HardwareConfig,
    HFConfig,
    JudgeConfig,
    LoaderConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    PrepareConfig,
    RawInputConfig,
    Remat,
    SandboxConfig,
    ServeConfig,
    SFTConfig,
    SFTSourceConfig,
    SourceConfig,
    SpikeConfig,
    SpikePolicy,
    StageConfig,
    TaskConfig,
    TokenizerConfig,
    TrainerConfig,
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
    "CarbonConfig",
    "ChatTemplateConfig",
    "GenerateConfig",
    "HFConfig",
    "JudgeConfig",
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
