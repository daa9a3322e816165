"""task=prepare: tokenize the data_mix's raw sources into shards, indexes and manifests
(or, with prepare.dry_run, estimate what that takes). The console gets one line per source
(files, documents, tokens, where the shards are, what was left out); every count is in
the run directory's prepare.json and in each source's manifest.

`prepare.dry_run=true` prepares nothing: it lists the corpus and estimates its tokens and
hours from a sample (`xgen.data.estimate`), so a cluster is sized before it is paid for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xgen.config import XGenConfig

log = logging.getLogger(__name__)


def dry_run(cfg: XGenConfig, run_dir: Path) -> dict:
    """The plan of a prepare, written to prepare_plan.json; no shard or manifest is written."""
    from xgen.data.estimate import format_plan, plan_mix
    from xgen.tokenizer import Tokenizer

    plan = plan_mix(cfg.data_mix, cfg.prepare, Tokenizer.from_name(cfg.tokenizer.name))
    log.info("prepare dry run of data_mix=%s (nothing prepared):\n%s", cfg.data_mix.name, format_plan(plan))
    (run_dir / "prepare_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    if cfg.prepare.dry_run:
        return dry_run(cfg, run_dir)
    from xgen.data.prepare import describe, prepare_mix
    from xgen.tokenizer import Tokenizer

    totals = prepare_mix(cfg.data_mix, Tokenizer.from_name(cfg.tokenizer.name), cfg.prepare)
    (run_dir / "prepare.json").write_text(json.dumps(totals, indent=1) + "\n")
    for name, t in totals.items():
        log.info("prepared %s", describe(name, cfg.data_mix.sources[name].path, t, cfg.data_mix.min_doc_tokens))
    log.info("every count: %s and each source's manifest.json", run_dir / "prepare.json")
    return totals
