"""Which documents each part of a mixture reads, with what weight.

- Filters: minimum document length, the license allow-list.
- Sub-stage chunks: the report shuffles all data once, splits it into disjoint chunks for
  the 2K, 4K and 8K sub-stages by their token budgets, then shuffles within each chunk.
- `weight_by`: a source split by a metadata field (StarCoder by language), each part
  weighted by its share of the source's tokens in the manifest, never typed by hand.
- Epochs: grain's `MapDataset.mix` draws from its inputs by exact integer proportions;
  `mixture_counts` reproduces its arithmetic, so the sequences taken from each source,
  and so each source's epoch, are known for any step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xgen.config import ConfigError, DataMixConfig, SourceConfig
from xgen.data.store import DocumentStore


@dataclass(frozen=True)
class Part:
    """Documents of one source (or one metadata value of it) and its share of the mixture."""

    name: str
    docs: np.ndarray
    weight: float


def stage_chunk(docs: np.ndarray, lengths: np.ndarray, split: dict[str, float], stage: str, seed: int) -> np.ndarray:
    """`docs` shuffled once with `seed`, then, if `stage` is in the split, only its chunk: cut
    by cumulative tokens in the split's proportions. Chunks of different stages are
    disjoint and together cover `docs`."""
    order = docs[np.random.default_rng(seed).permutation(len(docs))]
    if stage not in split:
        return order
    cum = np.cumsum(lengths[order])
    names = list(split)
    bounds = np.cumsum([split[n] for n in names]) / sum(split.values()) * (cum[-1] if len(cum) else 0)
    cut = np.searchsorted(cum, bounds, side="left")
    cut[-1] = len(order)
    k = names.index(stage)
    start = 0 if k == 0 else cut[k - 1]
    return order[start : cut[k]]


def select_parts(
    name: str, src: SourceConfig, store: DocumentStore, mix: DataMixConfig, stage: str
) -> list[Part]:
    """The source's parts after filtering and the stage's chunk, with their mixture weights."""
    keep = store.lengths >= mix.min_doc_tokens
    if src.licenses:
        if "license" not in store.meta:
            raise ConfigError(f"data_mix.sources.{name}.licenses is set but its data has no `license` metadata")
        keep &= np.isin(np.char.lower(store.meta["license"].astype(str)), [x.lower() for x in src.licenses])
    docs = stage_chunk(np.flatnonzero(keep), store.lengths, mix.stage_split, stage, mix.seed)
    if not src.weight_by:
        return [Part(name, docs, src.weight)]
    if src.weight_by not in store.meta:
        raise ConfigError(f"data_mix.sources.{name}.weight_by={src.weight_by!r}: the data has no such metadata")
    totals = store.tokens_by(src.weight_by)
    if totals is None:
        raise ConfigError(
            f"data_mix.sources.{name}.weight_by={src.weight_by!r}: its manifest has no token counts by that field "
            "(add it to prepare.count_tokens_by and prepare again)"
        )
    values = store.meta[src.weight_by][docs]
    all_tokens = sum(totals.values())
    parts = []
    for value in sorted(totals):
        part_docs = docs[values == value]
        if len(part_docs):
            parts.append(Part(f"{name}/{value}", part_docs, src.weight * totals[value] / all_tokens))
    return parts


def integer_proportions(weights: list[float]) -> list[int]:
    """grain's own conversion of mixture weights to integers (smallest weight -> 100)."""
    scale = 100 / min(weights)
    return [int(w * scale) for w in weights]


def mixture_counts(n: int, weights: list[float]) -> list[int]:
    """How many of the first `n` mixed elements come from each input of `MapDataset.mix`."""
    proportions = integer_proportions(weights)
    remaining, current, counts = sum(proportions), n, []
    for p in proportions:
        rest = current * (remaining - p) // remaining
        counts.append(current - rest)
        remaining -= p
        current = rest
    return counts
