"""The grain pipeline: sources -> packed windows -> weighted mixture -> shuffled batches.

Each source becomes a `grain.MapDataset` of packed windows, shuffled with the data seed and
repeated (a source that runs out starts a new, reshuffled epoch rather than changing the
mixture); `MapDataset.mix` interleaves them by weight, deterministically. The iterator's
state (grain's checkpointable state) is saved with every training checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import grain
import numpy as np

from xgen.config import ConfigError, DataMixConfig, StageConfig
from xgen.data.packing import pack_documents
from xgen.data.sources import load_documents
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def split_window(windows: np.ndarray) -> dict[str, np.ndarray]:
    """[batch, seq_len + 1] windows -> next-token `inputs` and `targets` of [batch, seq_len]."""
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def source_windows(mix: DataMixConfig, stage: StageConfig, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """Tokenize and pack every source of the mixture; log what was kept and dropped."""
    out = {}
    for name, src in mix.sources.items():
        docs = load_documents(name, src, mix.seed)
        tokens = tokenizer.encode_ordinary_batch(docs)
        windows, stats = pack_documents(
            tokens, seq_len=stage.seq_len, eot_id=tokenizer.eos_id, min_doc_tokens=mix.min_doc_tokens
        )
        log.info("data source %s: %s", name, asdict(stats))
        if stats.windows == 0:
            raise ConfigError(
                f"data_mix.sources.{name}: {stats.tokens} tokens after dropping {stats.dropped_short} documents "
                f"under {mix.min_doc_tokens} tokens: not one sequence of stage.seq_len={stage.seq_len}"
            )
        out[name] = windows
    return out


def build_dataset(mix: DataMixConfig, stage: StageConfig, tokenizer: Tokenizer) -> grain.MapDataset:
    """An endless, deterministic MapDataset whose element `i` is the batch of step `i`."""
    windows = source_windows(mix, stage, tokenizer)
    per_source = [
        grain.MapDataset.source(w).shuffle(seed=mix.seed + i).repeat() for i, w in enumerate(windows.values())
    ]
    weights = [mix.sources[name].weight for name in windows]
    mixed = grain.MapDataset.mix(per_source, weights) if len(per_source) > 1 else per_source[0]
    batch_size = stage.batch_tokens // stage.seq_len
    return mixed.batch(batch_size, drop_remainder=True).map(split_window)
