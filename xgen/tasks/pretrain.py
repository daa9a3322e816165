"""task=pretrain: train `model` on `data_mix` for one `stage`, resuming in the same run dir."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from xgen.config import XGenConfig

log = logging.getLogger(__name__)


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    import jax

    from xgen.data import build_pipeline
    from xgen.data.prepare import ensure_prepared  # data_mix=files: your own files, prepared on first use
    from xgen.runtime import Runtime
    from xgen.tokenizer import Tokenizer
    from xgen.train.trainer import Trainer

    # The mesh first (a wrong machine fails at once), then the data (a filter that empties a
    # part fails in seconds), then the model, its state and the compiled step (the slow part).
    runtime = Runtime.of(cfg)
    ensure_prepared(cfg.data_mix, Tokenizer.from_name(cfg.tokenizer.name), cfg.prepare, process_count=jax.process_count())
    pipeline = build_pipeline(
        cfg.data_mix,
        cfg.stage,
        Tokenizer.from_name(cfg.tokenizer.name),
        loader=cfg.loader,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    benchmarks = in_loop_benchmarks(cfg, runtime)  # their data read and checked before compiling
    trainer = Trainer(cfg, run_dir, runtime=runtime)
    if jax.process_index() == 0:
        pipeline.write_report(run_dir)  # what each part holds, weighs and lost: data_mix.json
    if cfg.trainer.init_from is None and cfg.stage.init_from_stage:
        log.warning(
            "stage %s starts from stage %s in the report; set trainer.init_from=<its run dir> "
            "(task=pretrain_all does) to continue it; starting from scratch",
            cfg.stage.name, cfg.stage.init_from_stage,
        )  # fmt: skip
    summary = trainer.fit(pipeline, evaluators=benchmarks)
    if jax.process_index() == 0:  # and what the run consumed of each source
        pipeline.write_report(run_dir, steps=summary["steps"])
    if cfg.prompt is not None:
        summary["sample"] = print_sample(cfg, runtime, run_dir, summary["steps"])
    return summary


def in_loop_benchmarks(cfg: XGenConfig, runtime) -> tuple:
    """`trainer.eval_tasks` as an evaluator for the loop (none when it is empty). Each task's
    config is `eval=<name>` composed with this command's data_dir; the one named like the
    command's own `eval` group is that config, with its `eval.*` overrides."""
    t = cfg.trainer
    if not t.eval_tasks or not t.eval_tasks_every:
        return ()
    from xgen.config.store import compose_eval
    from xgen.eval.inloop import BenchmarkEval
    from xgen.tokenizer import Tokenizer

    evals = []
    for name in t.eval_tasks:
        ev = cfg.eval if cfg.eval is not None and cfg.eval.name == name else compose_eval(name, [f"data_dir={cfg.data_dir}"])
        if t.eval_tasks_limit is not None:
            ev = dataclasses.replace(ev, limit=min(ev.limit or t.eval_tasks_limit, t.eval_tasks_limit))
        evals.append(ev)
    return (BenchmarkEval(evals, t.eval_tasks_every, runtime, Tokenizer.from_name(cfg.tokenizer.name), cfg.generate.max_len),)


def print_sample(cfg: XGenConfig, runtime, run_dir: Path, step: int) -> str:
    """With `prompt` set, what the trained model writes from it (the `generate.*` sampler,
    greedy by default), printed as task=generate prints it: the quickest look at whether the
    run learned anything."""
    import jax

    from xgen.generate import settings_from_config
    from xgen.generate.engine import Engine
    from xgen.tasks.generate import COMPLETION_MARK
    from xgen.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_name(cfg.tokenizer.name)
    engine = Engine(runtime, runtime.restore_params(run_dir / "checkpoints"), tokenizer, max_len=cfg.generate.max_len)
    (completion,) = engine.generate([tokenizer.encode(cfg.prompt)], settings_from_config(cfg.generate))
    if jax.process_index() == 0:
        how = "greedy" if cfg.generate.temperature == 0 else f"temperature {cfg.generate.temperature}"
        print(f"\nsample from the model at step {step} ({how}, {cfg.generate.max_new_tokens} tokens; "
              f"{COMPLETION_MARK} marks where the model starts):\n{cfg.prompt}{COMPLETION_MARK}{completion.text}\n", flush=True)  # fmt: skip
    return completion.text
