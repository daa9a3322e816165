"""task=pretrain: train `model` on `data_mix` for one `stage`, resuming in the same run dir."""

from __future__ import annotations

from pathlib import Path

from xgen.config import XGenConfig


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    import jax

    from xgen.data import build_pipeline
    from xgen.tokenizer import Tokenizer
    from xgen.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir)  # the mesh and the model first: a wrong machine fails before the data
    pipeline = build_pipeline(
        cfg.data_mix,
        cfg.stage,
        Tokenizer.from_name(cfg.tokenizer.name),
        loader=cfg.loader,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if jax.process_index() == 0:
        pipeline.write_report(run_dir)  # what each part holds, weighs and lost: data_mix.json
    return trainer.fit(pipeline)
