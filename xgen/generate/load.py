"""Load a model for inference from `checkpoint=`: an xgen run or checkpoint directory, or a
Hugging Face LLaMA directory (anything with a config.json), placed on the hardware's mesh."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from xgen.config import ConfigError, ModelConfig, XGenConfig
from xgen.generate.engine import Engine
from xgen.model.transformer import XGenModel
from xgen.parallel.mesh import axis_rules, make_mesh, state_shardings
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def model_config_of(path: str | Path) -> ModelConfig:
    """The model a checkpoint holds, from its own metadata (not from the command's `model=`)."""
    from xgen import checkpoint

    fields = checkpoint.read_meta(path).get("config", {}).get("model")
    if not fields:
        raise ConfigError(f"checkpoint={path}: its metadata names no model config")
    return ModelConfig(**fields)


def load_params(cfg: XGenConfig) -> tuple[ModelConfig, nnx.State]:
    """(model config, parameters placed on `hardware`'s mesh by the axis rules)."""
    if cfg.checkpoint is None:
        raise ConfigError(f"task={cfg.task.name} needs checkpoint=<run dir, checkpoint dir or Hugging Face dir>")
    path = Path(cfg.checkpoint)
    if not path.exists():
        raise ConfigError(f"checkpoint={path}: no such directory")
    is_hf = (path / "config.json").is_file()
    if is_hf:
        from xgen import hf

        model_cfg, pure = hf.load(path)
    else:
        model_cfg = model_config_of(path)
    mesh = make_mesh(cfg.hardware)
    abstract = nnx.state(nnx.eval_shape(lambda: XGenModel(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = state_shardings(abstract, mesh, axis_rules(cfg.hardware))
    if is_hf:
        abstract.replace_by_pure_dict(pure)
        params = jax.device_put(abstract, shardings)
    else:
        from xgen import checkpoint

        placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        params = checkpoint.restore_params(path, placed)
    log.info("loaded %s (%s) from %s", model_cfg.name, "Hugging Face" if is_hf else "xgen checkpoint", path)
    return model_cfg, params


def load_engine(cfg: XGenConfig) -> Engine:
    """An Engine for `cfg.checkpoint` with `cfg.tokenizer`, on `cfg.hardware`."""
    model_cfg, params = load_params(cfg)
    return Engine(
        model_cfg,
        params,
        Tokenizer.from_name(cfg.tokenizer.name),
        max_len=cfg.generate.max_len,
        dtype=jnp.dtype(cfg.hardware.compute_dtype),
    )
