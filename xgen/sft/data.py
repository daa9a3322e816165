"""`sft` config → a training pipeline of packed conversation rows, plus held-out rows.

The pipeline has the pretraining loader's face (`dataset[i]` is step i + 1's batch,
`iterator()` checkpoints its position, `epochs(step)`), so the same Trainer runs it with
its sharding, checkpoints, resume and spike handling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grain
import numpy as np

from xgen.config import ConfigError, XGenConfig
from xgen.sft.formats import Conversation, load_source
from xgen.sft.packing import Rows, pack, to_model_batch
from xgen.sft.render import render
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class SFTPipeline:
    """Batches of packed rows for the Trainer (see `xgen.data.loader.DataPipeline`)."""

    dataset: grain.MapDataset
    rows: Rows
    global_batch: int
    read_options: grain.ReadOptions

    def iterator(self) -> grain.DatasetIterator:
        return iter(self.dataset.to_iter_dataset(self.read_options))

    def epochs(self, steps: int) -> dict[str, float]:
        return {"sft": round(steps * self.global_batch / len(self.rows), 4)}

    def steps_for(self, epochs: float) -> int:
        """Steps that pass over the rows `epochs` times (at least one)."""
        return max(int(np.ceil(epochs * len(self.rows) / self.global_batch)), 1)


def load_conversations(cfg: XGenConfig, tokenizer: Tokenizer) -> list[Conversation]:
    """Every source's conversations, in config order, with their counts logged."""
    conversations: list[Conversation] = []
    for i, (name, src) in enumerate(cfg.sft.sources.items()):
        convs, counts = load_source(name, src, tokenizer, cfg.sft.seed + i)  # each source its own sample
        log.info("sft %s (%s): %s", name, src.format, ", ".join(f"{k} {v}" for k, v in counts.items()))
        conversations.extend(convs)
    if not conversations:
        raise ConfigError(f"sft={cfg.sft.name}: its sources hold no usable conversation")
    return conversations


def build_sft_data(
    cfg: XGenConfig, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1
) -> tuple[SFTPipeline, Rows | None]:
    """(training pipeline, held-out rows one conversation each, or None without `sft.heldout`)."""
    sft, stage = cfg.sft, cfg.stage
    conversations = load_conversations(cfg, tokenizer)
    order = np.random.default_rng(sft.seed).permutation(len(conversations))
    if sft.heldout >= len(conversations):
        raise ConfigError(f"sft.heldout={sft.heldout} leaves nothing to train on ({len(conversations)} conversations)")
    rendered = [render(conversations[i], cfg.chat_template, tokenizer, system_header=sft.system_header) for i in order]
    heldout = None
    if sft.heldout:
        heldout = pack(rendered[: sft.heldout], stage.seq_len, pad_id=tokenizer.eos_id, packing="pad")
        rendered = rendered[sft.heldout :]
    rows = pack(rendered, stage.seq_len, pad_id=tokenizer.eos_id, packing=sft.packing)
    log.info("sft rows of %d tokens (%s): %s", stage.seq_len, sft.packing, ", ".join(f"{k} {v}" for k, v in rows.counts.items()))
    global_batch = stage.batch_tokens // stage.seq_len
    if global_batch % process_count:
        raise ConfigError(f"a batch of {global_batch} sequences does not split over {process_count} processes")
    dataset = grain.MapDataset.source(rows).shuffle(seed=sft.seed).repeat()
    if process_count > 1:
        dataset = dataset[process_index::process_count]
    dataset = dataset.batch(global_batch // process_count, drop_remainder=True).map(to_model_batch)
    options = grain.ReadOptions(num_threads=cfg.loader.read_threads, prefetch_buffer_size=cfg.loader.prefetch_batches)
    return SFTPipeline(dataset, rows, global_batch, options), heldout
