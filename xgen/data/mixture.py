"""Which documents each part of a mixture reads, with what weight.

- Filters: minimum document length, the license allow-list, `where` (metadata values,
  e.g. SlimPajama subsets); list-valued metadata passes when any element does. A filter
  that cannot apply (no such metadata, no license anywhere) or that leaves nothing is a
  one-line error at start-up, never an empty part that grain quietly renormalizes away.
- Sub-stage chunks: the report shuffles all data once, splits it into disjoint chunks for
  the 2K, 4K and 8K sub-stages by their token budgets, then shuffles within each chunk.
- `weight_by`: a source split by a metadata field (StarCoder by language), each part
  weighted by its share of the tokens the source's filters keep, never typed by hand:
  StarCoderData's proportions are those after its license filter, so shares counted before
  the filters (prepare's manifest) would oversample a language whose files are mostly
  non-permissive.
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
from xgen.data.heldout import heldout_mask
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


def _filters(
    name: str, src: SourceConfig, store: DocumentStore, mix: DataMixConfig, heldout: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(documents kept, {filter: documents it removed}); a filter that cannot apply to the
    data, or that removes everything, is a one-line error naming the source and the counts.

    The held-out documents (`xgen.data.heldout`) are removed first, after the length rule;
    with `heldout`, they are the ones kept (the same filters then apply to them, so the
    held-out loss measures the data the source trains on)."""
    keep = store.lengths >= mix.min_doc_tokens
    removed = {"min_doc_tokens": ~keep}
    held = heldout_mask(store.keys, mix.heldout_share)
    if heldout:
        keep &= held
    else:
        removed["heldout"] = keep & held
        keep &= ~held
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
        # On a prepared index the filter is decided once per distinct value, then looked up
        # by each document's code: no string per document is ever built.
        coded = getattr(store.meta, "codes", None)
        codes, distinct = coded(fld) if coded else (None, None)
        if coded:
            present = distinct[np.bincount(codes, minlength=len(distinct)) > 0]
        if label == "license" and not ((present if coded else store.meta[fld]) != "").any():
            raise ConfigError(
                f"data_mix.sources.{name}.licenses is set but none of its {len(store)} documents carries a license "
                "(StarCoderData is already filtered to permissive licenses: set licenses: null; "
                "The Stack: raw.meta.license: max_stars_repo_licenses)"
            )
        ok = matches(distinct, allowed, casefold=casefold)[codes] if coded else matches(store.meta[fld], allowed, casefold=casefold)
        removed[label] = keep & ~ok
        if not (keep & ok).any() and not src.allow_empty and not heldout:
            raise ConfigError(
                f"data_mix.sources.{name}.{key}={allowed} keeps 0 of {int(keep.sum())} documents "
                f"(values: {_seen(store.meta[fld][keep])}); set allow_empty: true to run without it"
            )
        keep &= ok
    return keep, removed


def select_parts(name: str, src: SourceConfig, store: DocumentStore, mix: DataMixConfig, stage: str) -> list[Part]:
    """The source's parts after filtering and the stage's chunk, with their mixture weights.
    Parts may be empty here: the loader refuses them (or skips them with `allow_empty`).

    With `weight_by`, part `v` weighs `src.weight` x (tokens of value `v` that pass the
    filters) / (tokens of the source that pass them). The shares are taken after the filters
    (`min_doc_tokens`, `licenses`, `where`) because that is how StarCoderData publishes its
    per-language proportions: The Stack filtered to permissive licenses, then counted. Counted
    before them, a language whose files are mostly GPL would be drawn several times more than
    its share of the data that is actually read. The shares come from all kept documents, not
    from this stage's chunk, so every sub-stage weights the values identically; a value the
    filters empty weighs 0 and stays a part, so that the loader still refuses or skips it."""
    keep, removed = _filters(name, src, store, mix)
    docs = stage_chunk(np.flatnonzero(keep), store.lengths, mix.stage_split, stage, mix.seed)
    drops = {k: v for k, v in store.prepare_counts().items() if not k.startswith("missing_meta:")}
    if not src.weight_by:
        dropped = {**drops, **{k: int(m.sum()) for k, m in removed.items()}}
        return [Part(name, name, docs, src.weight, _nonzero(dropped))]
    if src.weight_by not in store.meta:
        raise ConfigError(f"data_mix.sources.{name}.weight_by={src.weight_by!r}: the data has no such metadata")
    # Array operations over the distinct values (a few dozen), never a loop per document.
    coded = getattr(store.meta, "codes", None)  # a prepared source's index stores them already
    code, values = coded(src.weight_by) if coded else _value_codes(store.meta[src.weight_by])[::-1]
    several = np.char.find(values, LIST_SEP) >= 0
    if several.any():
        count = int(np.bincount(code, minlength=len(values))[several].sum())
        raise ConfigError(
            f"data_mix.sources.{name}.weight_by={src.weight_by!r}: {count} documents have several values "
            "(a list); weight by a field with one value per document"
        )
    kept_tokens = np.bincount(code[keep], weights=store.lengths[keep], minlength=len(values))
    total = float(kept_tokens.sum())
    removed_by = {k: np.bincount(code[m], minlength=len(values)) for k, m in removed.items()}
    short_by = store.dropped_short_by(src.weight_by)
    # Each value's documents of the chunk, in the chunk's (shuffled) order.
    order = np.argsort(code[docs], kind="stable")
    bounds = np.searchsorted(code[docs][order], np.arange(len(values) + 1))
    parts = []
    for k, value in enumerate(map(str, values)):
        dropped = {"dropped_short": short_by.get(value, 0), **{r: c[k] for r, c in removed_by.items()}}
        weight = src.weight * float(kept_tokens[k]) / total if total else 0.0
        parts.append(Part(f"{name}/{value}", name, docs[order[bounds[k] : bounds[k + 1]]], weight, _nonzero(dropped)))
    return parts


def heldout_docs(name: str, src: SourceConfig, store: DocumentStore, mix: DataMixConfig) -> np.ndarray:
    """The source's held-out documents that pass its filters, in document order."""
    keep, _ = _filters(name, src, store, mix, heldout=True)
    return np.flatnonzero(keep)


def _value_codes(stored: np.ndarray, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct values, sorted; each document's index into them): `np.unique` with
    `return_inverse`, a chunk of documents at a time, so that on 10^8 documents no sorted
    copy of all the strings is made (and the smaller sorts run faster)."""
    stored = np.asarray(stored, dtype=str)
    found, code = [], np.empty(len(stored), np.int32 if len(stored) < 2**31 else np.int64)
    for start in range(0, len(stored), chunk):
        distinct, inverse = np.unique(stored[start : start + chunk], return_inverse=True)
        found.append(distinct)
        code[start : start + chunk] = inverse.reshape(-1)
    values = np.unique(np.concatenate(found)) if found else stored[:0]
    for start, distinct in zip(range(0, len(stored), chunk), found):
        code[start : start + chunk] = np.searchsorted(values, distinct)[code[start : start + chunk]]
    return values, code


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
