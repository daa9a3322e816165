"""task=prepare: tokenize the data_mix's raw sources into ArrayRecord shards and manifests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xgen.config import XGenConfig

log = logging.getLogger(__name__)


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    from xgen.data.prepare import prepare_mix
    from xgen.tokenizer import Tokenizer

    totals = prepare_mix(cfg.data_mix, Tokenizer.from_name(cfg.tokenizer.name), cfg.prepare)
    for name, t in totals.items():
        log.info("prepared %s: %s", name, json.dumps(t))
    (run_dir / "prepare.json").write_text(json.dumps(totals, indent=1) + "\n")
    return totals
