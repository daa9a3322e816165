"""Which documents each part of a mixture reads, with what weight.

- Filters: minimum document length, the license allow-list, `where` (metadata values,
  e.g. SlimPajama subsets); list-valued metadata passes when any element does. A filter
  that cannot apply (no such metadata, no license anywhere) or that leaves nothing is a
  one-line error at start-up, never an empty part that grain quietly renormalizes away.
- Sub-stage chunks: the report shuffles all data once, splits it into disjoint chunks for
  the 2K, 4K and 8K sub-stages by their token budgets, then shuffles within each chunk.
- `weight_by`: a source split by a metadata field (StarCoder by language), each part
  weighted by its share of the source's tokens in the manifest, never typed by hand.
- Epochs: grain's `MapDataset.mix` draws from its inputs by exact integer proportions;
  `mixture_counts` reproduces its arithmetic, so the sequences taken from each source,
  and so each source's epoch, are known for any step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from xgen.config import ConfigError, DataMixConfig, SourceConfig
from xgen.data.addresses import LIST_SEP, matches
from xgen.data.store import DocumentStore


@dataclass(frozen=True)
class Part:
    """Documents of one source (or one metadata value of it) and its share of the mixture.

    `dropped` counts what never reached `docs`, by reason: prepare's drops and skips
    (`dropped_short`, `malformed_json`, ...; per value for a split source where prepare
    knows the value) and this selection's filters (`license`, `where:<field>`)."""

    name: str
    source: str
    docs: np.ndarray
    weight: float
    dropped: dict[str, int] = field(default_factory=dict)


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


def _seen(values: np.ndarray, limit: int = 5) -> str:
    """The most common values, for an error that says what the data holds instead."""
    if not len(values):
        return "none"
    top = Counter(str(v).replace(LIST_SEP, "|") for v in values).most_common(limit)
    return ", ".join(f"{v or '(empty)'!r} x{n}" for v, n in top)


def _filters(name: str, src: SourceConfig, store: DocumentStore, mix: DataMixConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(documents kept, {filter: documents it removed}); a filter that cannot apply to the
    data, or that removes everything, is a one-line error naming the source and the counts."""
    keep = store.lengths >= mix.min_doc_tokens
    removed = {"min_doc_tokens": ~keep}
    conditions: list[tuple[str, str, list[str], bool]] = []
    if src.licenses is not None:
        conditions.append(("license", "license", list(src.licenses), True))
    conditions += [(f"where:{f}", f, list(values), False) for f, values in src.where.items()]
    for label, fld, allowed, casefold in conditions:
        key = "licenses" if label == "license" else f"where.{fld}"
        if fld not in store.meta:
            raise ConfigError(
                f"data_mix.sources.{name}.{key} is set but its data has no `{fld}` metadata "
                f"(fields: {sorted(store.meta) or 'none'}; add it to raw.meta and prepare again)"
            )
        values = store.meta[fld]
        if label == "license" and not (values != "").any():
            raise ConfigError(
                f"data_mix.sources.{name}.licenses is set but none of its {len(values)} documents carries a license "
                "(StarCoderData is already filtered to permissive licenses: set licenses: null; "
                "The Stack: raw.meta.license: max_stars_repo_licenses)"
            )
        ok = matches(values, allowed, casefold=casefold)
        removed[label] = keep & ~ok
        if not (keep & ok).any() and not src.allow_empty:
            raise ConfigError(
                f"data_mix.sources.{name}.{key}={allowed} keeps 0 of {int(keep.sum())} documents "
                f"(values: {_seen(values[keep])}); set allow_empty: true to run without it"
            )
        keep &= ok
    return keep, removed


def select_parts(
    name: str, src: SourceConfig, store: DocumentStore, mix: DataMixConfig, stage: str
) -> list[Part]:
    """The source's parts after filtering and the stage's chunk, with their mixture weights.
    Parts may be empty here: the loader refuses them (or skips them with `allow_empty`)."""
    keep, removed = _filters(name, src, store, mix)
    docs = stage_chunk(np.flatnonzero(keep), store.lengths, mix.stage_split, stage, mix.seed)
    drops = {k: v for k, v in store.prepare_counts().items() if not k.startswith("missing_meta:")}
    if not src.weight_by:
        dropped = {**drops, **{k: int(m.sum()) for k, m in removed.items()}}
        return [Part(name, name, docs, src.weight, _nonzero(dropped))]
    if src.weight_by not in store.meta:
        raise ConfigError(f"data_mix.sources.{name}.weight_by={src.weight_by!r}: the data has no such metadata")
    totals = store.tokens_by(src.weight_by)
    if totals is None:
        raise ConfigError(
            f"data_mix.sources.{name}.weight_by={src.weight_by!r}: its manifest has no token counts by that field "
            "(add it to prepare.count_tokens_by and prepare again)"
        )
    all_values = store.meta[src.weight_by]
    several = np.char.find(all_values.astype(str), LIST_SEP) >= 0
    if several.any():
        raise ConfigError(
            f"data_mix.sources.{name}.weight_by={src.weight_by!r}: {int(several.sum())} documents have several values "
            "(a list); weight by a field with one value per document"
        )
    values = all_values[docs]
    all_tokens = sum(totals.values())
    short_by = store.dropped_short_by(src.weight_by)
    parts = []
    for value in sorted(totals):
        of_value = all_values == value
        dropped = {"dropped_short": short_by.get(value, 0), **{k: int((m & of_value).sum()) for k, m in removed.items()}}
        weight = src.weight * totals[value] / all_tokens
        parts.append(Part(f"{name}/{value}", name, docs[values == value], weight, _nonzero(dropped)))
    return parts


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in sorted(counts.items()) if v}


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
