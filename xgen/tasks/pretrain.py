"""task=pretrain: train `model` on `data_mix` for one `stage`, resuming in the same run dir."""

from __future__ import annotations

from pathlib import Path

from xgen.config import XGenConfig


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    import jax

    from xgen.data import build_pipeline
    from xgen.runtime import Runtime
    from xgen.tokenizer import Tokenizer
    from xgen.train.trainer import Trainer

    # The mesh first (a wrong machine fails at once), then the data (a filter that empties a
    # part fails in seconds), then the model, its state and the compiled step (the slow part).
    runtime = Runtime.of(cfg)
    pipeline = build_pipeline(
        cfg.data_mix,
        cfg.stage,
        Tokenizer.from_name(cfg.tokenizer.name),
        loader=cfg.loader,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    trainer = Trainer(cfg, run_dir, runtime=runtime)
    if jax.process_index() == 0:
        pipeline.write_report(run_dir)  # what each part holds, weighs and lost: data_mix.json
    summary = trainer.fit(pipeline)
    if jax.process_index() == 0:  # and what the run consumed of each source
        pipeline.write_report(run_dir, steps=summary["steps"])
    return summary
