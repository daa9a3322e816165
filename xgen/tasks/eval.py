"""task=eval: benchmark a trained or imported model (the report's Section 5).

    python -m xgen.run task=eval eval=mmlu_5shot checkpoint=outputs/pretrain/<time> data_dir=data
    python -m xgen.run task=eval eval=humaneval checkpoint=... eval.n_samples=20
    python -m xgen.run task=eval eval=zeroshot checkpoint=... eval.limit=50   # a quick look

Each benchmark writes `<eval.name>.json` and `<eval.name>.md` (the report's table layout) in
the run directory and prints the table; finished items go to `<eval.name>_partial.jsonl`
as they complete, and rerunning in the same run directory (hydra.run.dir=...) skips them.
`task=report run_dir=...` gathers the results into one page.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from xgen.config import ConfigError, XGenConfig

# eval.kind -> module with `run_benchmark(cfg, run_dir) -> dict`.
BENCHMARKS = {
    "mmlu": "xgen.eval.mmlu",
    "zeroshot": "xgen.eval.zeroshot",
    "humaneval": "xgen.eval.humaneval",
    "ppl_by_position": "xgen.eval.ppl_by_position",
    "passkey": "xgen.eval.passkey",
    "summarization": "xgen.eval.summarization",
    "longform_qa": "xgen.eval.judged",
    "mt_bench": "xgen.eval.judged",
    "alpaca_eval": "xgen.eval.judged",
}


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    if cfg.eval is None:
        names = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "eval").glob("*.yaml"))
        raise ConfigError(f"task=eval needs eval=<benchmark> ({', '.join(names) or 'see conf/eval'})")
    module = BENCHMARKS.get(cfg.eval.kind)
    if module is None:
        raise ConfigError(f"eval.kind={cfg.eval.kind!r} is not one of: {', '.join(BENCHMARKS)}")
    return importlib.import_module(module).run_benchmark(cfg, run_dir)
