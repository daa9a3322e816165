"""task=sft: XGen-7B-Inst's supervised fine-tuning, prompt-masked, from a pretrained model.

    python -m xgen.run task=sft sft=wizardlm trainer.init_from=<pretrained run or import> hardware=tpu_v4_128

Only the parameters come from `trainer.init_from` (a fresh optimizer, step 0); steps default
to `sft.epochs` passes over the packed rows. With `sft.heldout` > 0 the loss on held-out
response tokens is measured for the starting and the final model (`sft_eval.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from xgen.config import ConfigError, XGenConfig

log = logging.getLogger(__name__)


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    import jax

    from xgen.sft.data import build_sft_data
    from xgen.tokenizer import Tokenizer
    from xgen.train.trainer import Trainer

    if cfg.sft is None:
        raise ConfigError("task=sft needs sft=<setting>: wizardlm, general or synthetic (conf/sft/)")
    if cfg.trainer.init_from is None:
        raise ConfigError("task=sft fine-tunes a pretrained model: set trainer.init_from=<run dir, checkpoint or import>")
    tokenizer = Tokenizer.from_name(cfg.tokenizer.name)
    pipeline, heldout = build_sft_data(
        cfg, tokenizer, process_index=jax.process_index(), process_count=jax.process_count()
    )
    steps = cfg.trainer.steps or pipeline.steps_for(cfg.sft.epochs)
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps=steps, init_params_only=True))
    summary = Trainer(cfg, run_dir).fit(pipeline)
    if heldout is not None:
        summary["heldout_response_loss"] = heldout_losses(cfg, run_dir, heldout)
        (run_dir / "sft_eval.json").write_text(json.dumps(summary["heldout_response_loss"], indent=2) + "\n")
    return summary


def heldout_losses(cfg: XGenConfig, run_dir: Path, heldout) -> dict[str, float]:
    """Held-out response loss of the starting model and of this run's final checkpoint."""
    from xgen.runtime import Runtime
    from xgen.sft.evaluate import response_loss

    runtime = Runtime.of(cfg)  # sharded as training was: a 7B model never lands on one device
    losses = {
        name: round(response_loss(runtime, runtime.restore_params(path), heldout), 4)
        for name, path in (("base", cfg.trainer.init_from), ("final", run_dir))
    }
    log.info(
        "held-out response loss (%d conversations): base model %.4f, fine-tuned %.4f",
        len(heldout), losses["base"], losses["final"],
    )  # fmt: skip
    return losses
