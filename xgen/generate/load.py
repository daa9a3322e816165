"""Load a model for inference from `checkpoint=`: an xgen run or checkpoint directory, or a
Hugging Face LLaMA directory (anything with a config.json), placed on the hardware's mesh
and run with the command's `execution` settings (never the ones it was trained with)."""

from __future__ import annotations

import logging
from pathlib import Path

from flax import nnx

from xgen.config import ConfigError, ModelConfig, XGenConfig
from xgen.generate.engine import Engine
from xgen.runtime import Runtime, model_config_from_meta
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def model_config_of(path: str | Path) -> ModelConfig:
    """The model a checkpoint holds, from its own metadata (not from the command's `model=`)."""
    from xgen import checkpoint

    fields = checkpoint.read_meta(path).get("config", {}).get("model")
    if not fields:
        raise ConfigError(f"checkpoint={path}: its metadata names no model config")
    return model_config_from_meta(fields, f"checkpoint={path}")


def load_params(cfg: XGenConfig) -> tuple[Runtime, nnx.State]:
    """(runtime of the checkpoint's architecture on `hardware`, its parameters on their shards)."""
    if cfg.checkpoint is None:
        raise ConfigError(f"task={cfg.task.name} needs checkpoint=<run dir, checkpoint dir or Hugging Face dir>")
    path = Path(cfg.checkpoint)
    if not path.exists():
        raise ConfigError(f"checkpoint={path}: no such directory")
    if (path / "config.json").is_file():
        from xgen import hf

        model_cfg, pure = hf.load(path)
        runtime = Runtime.of(cfg, model=model_cfg)
        params = runtime.place_params(pure)
    else:
        runtime = Runtime.of(cfg, model=model_config_of(path))
        params = runtime.restore_params(path)
    log.info(
        "loaded %s from %s | mesh %s | attention %s, %s matmuls, %s KV cache",
        runtime.model.name, path, dict(runtime.mesh.shape), runtime.execution.attention, runtime.dtype, runtime.kv_dtype,
    )  # fmt: skip
    return runtime, params


def load_engine(cfg: XGenConfig, score_all_rows: bool | None = None) -> Engine:
    """An Engine for `cfg.checkpoint` with `cfg.tokenizer`, on `cfg.hardware`; log-probs over
    every output row if `score_all_rows` (None: as `eval.normalize_over_all_rows` says)."""
    runtime, params = load_params(cfg)
    if score_all_rows is None:  # benchmarks score as the reference implementations do unless told
        score_all_rows = cfg.eval.normalize_over_all_rows if cfg.eval is not None else False
    tokenizer = Tokenizer.from_name(cfg.tokenizer.name)
    return Engine(runtime, params, tokenizer, max_len=cfg.generate.max_len, score_all_rows=score_all_rows)
