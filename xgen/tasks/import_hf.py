"""task=import_hf: a Hugging Face LLaMA-architecture directory as an xgen checkpoint.

Writes a parameters-only checkpoint under `out`/checkpoints whose metadata holds the model
config read from config.json; `trainer.init_from=<out>` then trains from it (fresh optimizer).
Anything that is not plain LLaMA (RoPE scaling, biases, other activations, missing or extra
tensors) is refused in one line rather than converted into a different model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from xgen.config import ConfigError, ModelConfig, XGenConfig

log = logging.getLogger(__name__)


def run(cfg: XGenConfig, run_dir: Path) -> Path:
    if cfg.hf_path is None or cfg.out is None:
        raise ConfigError("task=import_hf needs hf_path=<Hugging Face model directory> and out=<new directory>")
    from xgen.checkpoint import read_meta
    from xgen.hf.convert import model_overrides
    from xgen.hf.io import import_checkpoint
    from xgen.runtime import model_config_from_meta

    out = import_checkpoint(cfg.hf_path, cfg.out)
    model = model_config_from_meta(read_meta(out)["config"]["model"], f"out={out}")
    log.info("train from it: python -m xgen.run trainer.init_from=%s %s", out, " ".join(model_overrides(model, shipped_models())))
    return out


def shipped_models() -> dict[str, ModelConfig]:
    """conf/model's options, each as `model=<name>` composes it (includes resolved), so the
    suggestion after an import names the shipped model it is (`model=tiny`) rather than
    spelling out a dozen `model.*` keys."""
    from xgen.config.store import compose, shipped

    names = shipped("model")
    return {name: cfg.model for name, cfg in zip(names, compose([[f"model={name}"] for name in names]))}
