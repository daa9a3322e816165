"""Registers the schema with Hydra's ConfigStore and turns a DictConfig into typed objects."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from xgen.config.schema import XGenConfig


def register_configs() -> None:
    """Store the top-level schema as `xgen_schema`; `conf/config.yaml` lists it first in its defaults.

    Every group YAML is then merged into its typed field of XGenConfig, which is what
    makes unknown keys and wrong types fail at start-up.
    """
    ConfigStore.instance().store(name="xgen_schema", node=XGenConfig)


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys the schema does not have (added with `+`, which bypasses Hydra's struct check),
    each with the closest known key: `+trainer.stepz` (did you mean trainer.steps?)."""
    found = []
    kind = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    for key in node.keys():
        path = f"{prefix}{key}"
        if known is not None and key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            found.append(path + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found.extend(unknown_keys(child, path + "."))
    return found


def to_object(cfg: DictConfig) -> XGenConfig:
    """Resolve interpolations and return the typed dataclass tree the rest of xgen reads;
    a key the schema does not know (a `+key=value` override) is an error."""
    unknown = unknown_keys(cfg.copy() if "hydra" not in cfg else _without_hydra(cfg))
    if unknown:
        from xgen.config.errors import ConfigError

        raise ConfigError(f"unknown config key {unknown[0]}: `+` cannot add a key the schema does not have")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, XGenConfig), type(obj)
    return obj


def _without_hydra(cfg: DictConfig) -> DictConfig:
    copy = cfg.copy()
    with open_dict(copy):
        del copy["hydra"]
    return copy


def closest_key(path: str) -> str | None:
    """The schema key nearest a misspelt dotted `path` (`model.d_modle` -> `model.d_model`)."""
    import typing

    kind: Any = XGenConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(kind):
            return None
        fields = {f.name: f for f in dataclasses.fields(kind)}
        if part not in fields:
            close = difflib.get_close_matches(part, sorted(fields), n=1)
            return ".".join([*parts[:i], close[0], *parts[i + 1 :]]) if close else None
        hints = typing.get_type_hints(kind)
        kind = hints[part]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if typing.get_origin(kind) is typing.Union and args else kind
    return None


def compose(overrides_list: list[list[str]]) -> list[XGenConfig]:
    """The typed config of each list of overrides, composed as `python -m xgen.run` composes
    it: for what a command needs of another config (an `eval/` file for the loop, an
    execution preset for the plan, the shipped models after an import). Inside
    `python -m xgen.run` Hydra is initialized already; elsewhere (a test calling a task)
    the packaged conf/ is used."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def each() -> list[XGenConfig]:
        return [to_object(hydra_compose("config", overrides=list(o))) for o in overrides_list]

    if GlobalHydra.instance().is_initialized():
        return each()
    register_configs()
    with initialize_config_module(config_module="xgen.conf", version_base="1.3"):
        return each()


def shipped(group: str) -> list[str]:
    """The options of a config group as `python -m xgen.run` finds them (`pkg://xgen.conf`)."""
    from xgen.config.snapshots import conf_dir

    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose_eval(name: str, overrides: list[str]):
    """The `eval/<name>` config as this command would compose it with `eval=<name>` (and the
    command's own `overrides`, e.g. data_dir): what `trainer.eval_tasks` runs in the loop."""
    return compose([[f"eval={name}", *overrides]])[0].eval
