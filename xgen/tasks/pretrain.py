"""task=pretrain: train `model` on `data_mix` for one `stage`, resuming in the same run dir."""

from __future__ import annotations

from pathlib import Path

from xgen.config import XGenConfig


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    from xgen.data import build_dataset
    from xgen.tokenizer import Tokenizer
    from xgen.train.trainer import Trainer

    dataset = build_dataset(cfg.data_mix, cfg.stage, Tokenizer.from_name(cfg.tokenizer.name))
    return Trainer(cfg, run_dir).fit(dataset)
