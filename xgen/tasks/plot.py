"""task=plot: the report's Figure 1 (training loss over tokens, stages marked) as a PNG.

`run_dir` is a pretrain run directory, or a pretrain_all one whose stages sit in
subdirectories; each stage's metrics.jsonl becomes one segment of the curve.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xgen.config import ConfigError, XGenConfig

log = logging.getLogger(__name__)


def stage_metrics(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """(stage name, records) in training order."""
    files = [run_dir / "metrics.jsonl"] if (run_dir / "metrics.jsonl").exists() else sorted(run_dir.glob("*/metrics.jsonl"))
    stages = []
    for f in files:
        records = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if records:
            stages.append((f.parent.name, records))
    if not stages:
        raise ConfigError(f"run_dir={run_dir}: no metrics.jsonl there or in its stage folders")
    return sorted(stages, key=lambda s: s[1][0]["step"])


def run(cfg: XGenConfig, run_dir: Path) -> Path:
    if cfg.run_dir is None:
        raise ConfigError("task=plot needs run_dir=<a pretrain or pretrain_all run directory>")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("task=plot needs matplotlib: pip install 'xgen[plot]'") from None
    stages = stage_metrics(Path(cfg.run_dir))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name, records in stages:
        tokens = [r["tokens_seen"] / 1e9 for r in records]
        ax.plot(tokens, [r["loss"] for r in records], label=name, linewidth=1.2)
        ax.axvline(tokens[0], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("tokens seen (billions)")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss by stage")
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    log.info("wrote %s", out)
    return out
