"""task=export_hf: an xgen checkpoint as a Hugging Face `LlamaForCausalLM` directory.

`checkpoint` is a run directory, its checkpoints/ folder or a params-only checkpoint
(task=import_hf); `out` receives config.json, generation_config.json, safetensors shards
and the XGen tokenizer, loadable by `AutoModelForCausalLM`/`AutoTokenizer` with no custom code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from xgen.config import ConfigError, XGenConfig

log = logging.getLogger(__name__)


def run(cfg: XGenConfig, run_dir: Path) -> Path:
    if cfg.checkpoint is None or cfg.out is None:
        raise ConfigError("task=export_hf needs checkpoint=<run dir or checkpoint> and out=<new directory>")
    from xgen.hf.io import export_checkpoint

    if cfg.hf.max_shard_bytes <= 0:
        raise ConfigError(f"hf.max_shard_bytes={cfg.hf.max_shard_bytes} must be a positive number of bytes")
    out = export_checkpoint(cfg.checkpoint, cfg.out, max_shard_bytes=cfg.hf.max_shard_bytes)
    log.info("exported %s to %s (load with transformers.AutoModelForCausalLM.from_pretrained)", cfg.checkpoint, out)
    return out
