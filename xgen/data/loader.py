"""The grain pipeline: sources -> packed windows -> weighted mixture -> this host's batches.

Each part of the mixture is a `grain.MapDataset` of packed windows, shuffled with the data
seed and repeated (a part that runs out starts a new, reshuffled epoch instead of changing
the mixture); `MapDataset.mix` interleaves the parts by weight, exactly and
deterministically. Element i of the mixture is sequence i of the run: host p of P takes
elements p, p+P, ... (grain's sharding by process index), so the hosts' batches of a
step together are the single-host batch. The iterator's state is saved in checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import grain

from xgen.config import ConfigError, DataMixConfig, LoaderConfig, StageConfig
from xgen.data.mixture import mixture_counts, select_parts
from xgen.data.packing import PackedWindows, to_model_batch
from xgen.data.sources import open_store
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class DataPipeline:
    """`dataset[i]` is this host's share of the batch of step i + 1."""

    dataset: grain.MapDataset
    names: list[str]
    parts: list[PackedWindows]
    weights: list[float]
    global_batch: int
    read_options: grain.ReadOptions

    def iterator(self) -> grain.DatasetIterator:
        """Batches in step order, built ahead by grain's threads; checkpointable state."""
        return iter(self.dataset.to_iter_dataset(self.read_options))

    def epochs(self, steps: int) -> dict[str, float]:
        """Epochs of each part consumed after `steps` steps (1.0 = every window once)."""
        counts = mixture_counts(steps * self.global_batch, self.weights) if len(self.weights) > 1 else [steps * self.global_batch]
        return {n: round(c / len(p), 4) for n, c, p in zip(self.names, counts, self.parts)}


def build_pipeline(
    mix: DataMixConfig,
    stage: StageConfig,
    tokenizer: Tokenizer,
    *,
    loader: LoaderConfig | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> DataPipeline:
    global_batch = stage.batch_tokens // stage.seq_len
    if global_batch % process_count:
        raise ConfigError(f"a batch of {global_batch} sequences does not split over {process_count} processes")
    names, parts, weights, datasets = [], [], [], []
    for name, src in mix.sources.items():
        store = open_store(name, src, tokenizer, mix.seed)
        for part in select_parts(name, src, store, mix, stage.name):
            packed = PackedWindows(store, part.docs, seq_len=stage.seq_len, eot_id=tokenizer.eos_id)
            log.info(
                "data %s: %d documents (%d under %d tokens dropped of %d), %d tokens, %d sequences of %d, weight %.4f",
                part.name, len(part.docs), int((store.lengths < mix.min_doc_tokens).sum()), mix.min_doc_tokens,
                len(store), packed.total_tokens, len(packed), stage.seq_len, part.weight,
            )  # fmt: skip
            if len(packed) == 0:
                raise ConfigError(
                    f"data_mix.sources.{name}: {part.name} has {packed.total_tokens} tokens, "
                    f"not one sequence of stage.seq_len={stage.seq_len}"
                )
            seed = mix.seed + len(datasets)
            datasets.append(grain.MapDataset.source(packed).shuffle(seed=seed).repeat())
            names.append(part.name), parts.append(packed), weights.append(part.weight)
    mixed = grain.MapDataset.mix(datasets, weights) if len(datasets) > 1 else datasets[0]
    if process_count > 1:
        mixed = mixed[process_index::process_count]
    dataset = mixed.batch(global_batch // process_count, drop_remainder=True).map(
        partial(to_model_batch, document_masking=mix.document_masking)
    )
    loader = loader or LoaderConfig()
    read_options = grain.ReadOptions(num_threads=loader.read_threads, prefetch_buffer_size=loader.prefetch_batches)
    return DataPipeline(dataset, names, parts, weights, global_batch, read_options)

