"""task=eval: benchmark a trained or imported model (the report's Tables 4 and 5).

    python -m xgen.run task=eval eval=mmlu_5shot checkpoint=outputs/pretrain/<time> data_dir=data
    python -m xgen.run task=eval eval=mmlu_0shot checkpoint=... eval.max_questions=20   # a quick look

Writes mmlu.json (per subject, per category, weighted average) and mmlu.md (Table 4's layout)
in the run directory and prints the table. Subjects finished go to mmlu_partial.jsonl as they
complete; rerunning in the same run directory (hydra.run.dir=...) skips them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xgen.config import ConfigError, XGenConfig

log = logging.getLogger(__name__)


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    if cfg.eval is None:
        raise ConfigError("task=eval needs eval=<benchmark> (mmlu_5shot, mmlu_0shot)")
    if cfg.eval.kind != "mmlu":
        raise ConfigError(f"eval.kind={cfg.eval.kind!r} is not one of: mmlu")
    from xgen.eval.mmlu import EnginePredictor, evaluate, markdown_table, subjects_in

    subjects = subjects_in(cfg.eval.data_path)  # before loading the model: fail fast on missing data
    from xgen.generate.load import load_engine

    engine = load_engine(cfg)
    result = evaluate(
        cfg.eval.data_path,
        engine.tokenizer,
        engine.max_len - 1,
        EnginePredictor(engine, cfg.eval.batch_size),
        shots=cfg.eval.shots,
        max_questions=cfg.eval.max_questions,
        chunk=max(1, cfg.eval.batch_size // 4),
        partial_path=run_dir / "mmlu_partial.jsonl",
        subjects=subjects,
    )
    result = {"benchmark": cfg.eval.name, "checkpoint": str(cfg.checkpoint), **result}
    (run_dir / "mmlu.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown_table(result, Path(str(cfg.checkpoint)).name or str(cfg.checkpoint))
    (run_dir / "mmlu.md").write_text(table)
    print(table, flush=True)
    log.info("MMLU %d-shot: %.4f over %d questions; written to %s", cfg.eval.shots, result["average"], result["questions"], run_dir)
    return result
