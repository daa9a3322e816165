"""task=pretrain_all: run `task.stages` in order, each from the previous stage's checkpoint.

Each stage's config is composed as `python -m xgen.run <your overrides> stage=<name>` would
compose it (so a stage that brings its own data mix does), then chained: `trainer.init_from`
is the previous stage's run directory and `optimizer.decay_steps` spans all the stages, so
the learning-rate schedule continues across the hand-offs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from xgen.config import XGenConfig, to_object

log = logging.getLogger(__name__)


def stage_configs(cfg: XGenConfig) -> list[XGenConfig]:
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # called outside a Hydra app (tests compose their own)
        overrides = []
    own = ("task=", "task.", "stage=", "trainer.init_from=")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(own)]
    return [to_object(compose("config", overrides=[*kept, f"stage={name}"])) for name in cfg.task.stages]


def run(cfg: XGenConfig, run_dir: Path) -> list[dict]:
    from xgen.config.validate import validate
    from xgen.tasks import pretrain
    from xgen.train.trainer import stage_steps

    configs = stage_configs(cfg)
    total = sum(stage_steps(c) for c in configs)
    summaries, previous = [], None
    for stage_cfg in configs:
        stage_cfg.optimizer.decay_steps = stage_cfg.optimizer.decay_steps or total
        stage_cfg.trainer.init_from = str(previous) if previous else None
        validate(stage_cfg)
        stage_dir = run_dir / stage_cfg.stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        log.info("stage %s (%d steps) in %s", stage_cfg.stage.name, stage_steps(stage_cfg), stage_dir)
        summaries.append(pretrain.run(stage_cfg, stage_dir))
        previous = stage_dir
    return summaries
