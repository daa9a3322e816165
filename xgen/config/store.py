"""Registers the schema with Hydra's ConfigStore and turns a DictConfig into typed objects."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from xgen.config.schema import XGenConfig


def register_configs() -> None:
    """Store the top-level schema as `xgen_schema`; `conf/config.yaml` lists it first in its defaults.

    Every group YAML is then merged into its typed field of XGenConfig, which is what
    makes unknown keys and wrong types fail at start-up.
    """
    ConfigStore.instance().store(name="xgen_schema", node=XGenConfig)


def to_object(cfg: DictConfig) -> XGenConfig:
    """Resolve interpolations and return the typed dataclass tree the rest of xgen reads."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, XGenConfig), type(obj)
    return obj
