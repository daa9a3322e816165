"""The grain pipeline: sources -> packed windows -> weighted mixture -> this host's batches.

Each part of the mixture is a `grain.MapDataset` of packed windows, shuffled with the data
seed and repeated (a part that runs out starts a new, reshuffled epoch instead of changing
the mixture); `MapDataset.mix` interleaves the parts by weight, exactly and
deterministically. Element i of the mixture is sequence i of the run: host p of P takes
elements p, p+P, ... (grain's sharding by process index), so the hosts' batches of a
step together are the single-host batch. The iterator's state is saved in checkpoints.

Nothing is lost quietly: a part with no sequence, or a source whose sampled share differs
from its configured one (a part went missing), stops the run at start-up in one line
unless the source says `allow_empty`; every run logs the mixture as a table and writes it
to `data_mix.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grain
import numpy as np

from xgen.config import ConfigError, DataMixConfig, LoaderConfig, StageConfig
from xgen.data.mixture import Part, heldout_docs, integer_proportions, mixture_counts, select_parts
from xgen.data.packing import PackedWindows, to_model_batch
from xgen.data.sources import open_store
from xgen.data.store import DocumentStore
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class DataPipeline:
    """`dataset[i]` is this host's share of the batch of step i + 1; `report` is what each
    part holds and weighs (written to the run's `data_mix.json`)."""

    dataset: grain.MapDataset
    names: list[str]
    parts: list[PackedWindows]
    weights: list[float]
    global_batch: int
    read_options: grain.ReadOptions
    report: dict = field(default_factory=dict)
    heldout: dict[str, PackedWindows] = field(default_factory=dict)  # source -> its held-out windows
    document_masking: bool = False
    identity: dict[str, str] = field(default_factory=dict)  # source -> its documents' digest (`store_identity`)

    def heldout_batches(
        self, batches: int, process_index: int = 0, process_count: int = 1, rows: int | None = None
    ) -> dict[str, list[dict]]:
        """Per source, up to `batches` x the global batch of its held-out windows (in a fixed
        shuffled order: the same windows every evaluation), in batches of `rows` (default the
        global batch) as this host's rows; every batch carries `loss_mask`, 0 on the rows
        that pad the last one. Sources with no held-out window are left out (counted in
        data_mix.json's `heldout`)."""
        out: dict[str, list[dict]] = {}
        rows = rows or self.global_batch
        local = rows // process_count
        for name, packed in self.heldout.items():
            n = min(len(packed), batches * self.global_batch)
            if n == 0:
                continue
            order = np.random.default_rng(0).permutation(len(packed))[:n]
            source = []
            for first in range(0, n, rows):
                ids = list(order[first : first + rows])
                real = np.zeros(rows, np.int32)
                real[: len(ids)] = 1
                ids += [ids[0]] * (rows - len(ids))
                windows = [packed[int(i)] for i in ids]
                stacked = {k: np.stack([w[k] for w in windows]) for k in windows[0]}
                batch = to_model_batch(stacked, self.document_masking)
                batch["loss_mask"] = batch.get("loss_mask", np.ones_like(batch["targets"])) * real[:, None]
                mine = slice(process_index * local, (process_index + 1) * local)
                source.append({k: v[mine] for k, v in batch.items()})
            out[name] = source
        return out

    def iterator(self) -> grain.DatasetIterator:
        """Batches in step order, built ahead by grain's threads; checkpointable state."""
        return iter(self.dataset.to_iter_dataset(self.read_options))

    def epochs(self, steps: int) -> dict[str, float]:
        """Epochs of each part consumed after `steps` steps (1.0 = every window once)."""
        counts = mixture_counts(steps * self.global_batch, self.weights) if len(self.weights) > 1 else [steps * self.global_batch]
        return {n: round(c / len(p), 4) for n, c, p in zip(self.names, counts, self.parts)}

    def consumed(self, steps: int) -> dict:
        """Sequences and tokens each part and source gave to the first `steps` steps."""
        counts = mixture_counts(steps * self.global_batch, self.weights) if len(self.weights) > 1 else [steps * self.global_batch]
        seq_len = self.report["seq_len"]
        parts = {n: {"sequences": c, "tokens": c * seq_len} for n, c in zip(self.names, counts)}
        by_source: dict[str, int] = {}
        for row in self.report["parts"]:
            if row["part"] in parts:
                by_source[row["source"]] = by_source.get(row["source"], 0) + parts[row["part"]]["tokens"]
        return {"steps": steps, "parts": parts, "tokens_by_source": by_source}

    def write_report(self, run_dir: Path, steps: int | None = None) -> None:
        """data_mix.json; with `steps`, each source's reconciliation ends with the tokens the
        run consumed from it."""
        run_dir.mkdir(parents=True, exist_ok=True)
        report = dict(self.report)
        if steps is not None:
            report["consumed"] = consumed = self.consumed(steps)
            report["sources"] = {
                name: {**src, "reconciliation": {**src["reconciliation"], "tokens_consumed": consumed["tokens_by_source"].get(name, 0)}}
                for name, src in self.report["sources"].items()
            }
        (run_dir / "data_mix.json").write_text(json.dumps(report, indent=1) + "\n")


def sampling_weights(weights: list[float]) -> list[float]:
    """The shares grain's `MapDataset.mix` actually draws (its integer proportions)."""
    if len(weights) == 1:
        return [1.0]
    ints = integer_proportions(weights)
    return [i / sum(ints) for i in ints]


def _empty_part_error(part: Part, packed: PackedWindows, seq_len: int) -> str:
    what = "no documents" if not len(part.docs) else f"{packed.total_tokens} tokens, not one sequence of stage.seq_len={seq_len}"
    return (
        f"data_mix.sources.{part.source}: part {part.name} has {what} "
        f"(dropped: {part.dropped or 'nothing'}); set data_mix.sources.{part.source}.allow_empty=true to run without it"
    )


def _check_source_weights(mix: DataMixConfig, rows: list[dict]) -> None:
    """Each source's share as sampled against its configured share (over the parts that
    run: a part skipped by `allow_empty` gives its share to all the others), so weights
    that grain's integer proportions cannot draw fail here instead of shifting the mix."""
    running = [r for r in rows if "skipped" not in r]
    total = sum(r["configured_weight"] for r in running)
    for name in mix.sources:
        want = sum(r["configured_weight"] for r in running if r["source"] == name) / total
        got = sum(r["weight"] for r in running if r["source"] == name)
        if abs(got - want) > mix.weight_tolerance * want:
            raise ConfigError(
                f"data_mix.sources.{name}: sampled share {got:.4f} differs from the configured {want:.4f} "
                f"by more than data_mix.weight_tolerance={mix.weight_tolerance} (parts: "
                + ", ".join(f"{r['part']} {r['weight']:.4f}" for r in running if r["source"] == name) + ")"
            )


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
    kept: list[tuple[Part, PackedWindows]] = []
    heldout: dict[str, PackedWindows] = {}
    identity: dict[str, str] = {}
    rows: list[dict] = []
    sources: dict[str, dict] = {}
    for name, src in mix.sources.items():
        store = open_store(name, src, tokenizer, mix.seed)
        counts = store.prepare_counts()
        sources[name] = {"documents_prepared": len(store), **({"prepare": counts} if counts else {})}
        parts = select_parts(name, src, store, mix, stage.name)
        sources[name]["reconciliation"] = reconcile(name, store, parts, mix)
        identity[name] = store_identity(store)
        held = heldout_docs(name, src, store, mix)
        heldout[name] = PackedWindows(store, held, seq_len=stage.seq_len, eot_id=tokenizer.eos_id)
        sources[name]["heldout"] = {"share": mix.heldout_share, "documents": len(held),
                                    "tokens": int(store.lengths[held].sum(dtype=np.int64)), "sequences": len(heldout[name])}  # fmt: skip
        for part in parts:
            packed = PackedWindows(store, part.docs, seq_len=stage.seq_len, eot_id=tokenizer.eos_id)
            row = {"source": name, "part": part.name, "configured_weight": part.weight, "weight": 0.0,
                   "documents": len(part.docs), "tokens": int(store.lengths[part.docs].sum()),
                   "sequences": len(packed), "dropped": part.dropped}  # fmt: skip
            rows.append(row)
            if len(packed) == 0:
                if not src.allow_empty:
                    raise ConfigError(_empty_part_error(part, packed, stage.seq_len))
                row["skipped"] = "empty (allow_empty)"
                log.warning("data %s: %s", part.name, _empty_part_error(part, packed, stage.seq_len))
                continue
            kept.append((part, packed))
    if not kept:
        raise ConfigError(f"data_mix={mix.name}: no part has a sequence of stage.seq_len={stage.seq_len}")
    total_configured = sum(r["configured_weight"] for r in rows)
    for r in rows:
        r["configured_weight"] = round(r["configured_weight"] / total_configured, 6)
    used = iter(sampling_weights([p.weight for p, _ in kept]))
    for r in rows:
        if "skipped" not in r:
            r["weight"] = round(next(used), 6)
    _check_source_weights(mix, rows)
    _log_table(rows, stage.seq_len)

    datasets = []
    for k, (part, packed) in enumerate(kept):
        datasets.append(grain.MapDataset.source(packed).shuffle(seed=mix.seed + k).repeat())
    weights = [p.weight for p, _ in kept]
    mixed = grain.MapDataset.mix(datasets, weights) if len(datasets) > 1 else datasets[0]
    loader = loader or LoaderConfig()
    if loader.trace_sequences:  # each window's index in the mixture: the run's sequence id
        mixed = mixed.map_with_index(lambda i, window: {**window, "sequence_ids": np.int64(i)})
    if process_count > 1:
        mixed = mixed[process_index::process_count]
    dataset = mixed.batch(global_batch // process_count, drop_remainder=True).map(
        partial(to_model_batch, document_masking=mix.document_masking)
    )
    read_options = grain.ReadOptions(num_threads=loader.read_threads, prefetch_buffer_size=loader.prefetch_batches)
    report = {"data_mix": mix.name, "stage": stage.name, "seq_len": stage.seq_len, "parts": rows, "sources": sources}
    return DataPipeline(
        dataset, [p.name for p, _ in kept], [w for _, w in kept], weights, global_batch, read_options, report,
        heldout=heldout, document_masking=mix.document_masking, identity=identity,
    )  # fmt: skip


def reconcile(name: str, store: DocumentStore, parts: list[Part], mix: DataMixConfig) -> dict:
    """From raw bytes to the tokens this stage reads, every document accounted for:

        records read = documents read + records dropped at prepare (bad UTF-8, JSON, field)
        documents read = documents in shards + documents under min_doc_tokens at prepare
        documents in shards = documents kept by the filters + removed by each filter
        documents kept = documents of this stage's chunk + of the other stages' chunks

    The prepare-side lines (the first two, and the manifest against the index) are checked:
    a count that does not add up means documents went missing between the steps, and the
    run is refused in one line rather than trained on a quietly smaller corpus. With the
    run's steps, `write_report` adds the tokens consumed."""
    totals = store.prepare_totals()
    prepared, tokens_prepared = len(store), int(store.lengths.sum(dtype=np.int64))
    by_filter: dict[str, int] = {}
    selected_docs = selected_tokens = 0
    for part in parts:
        selected_docs += len(part.docs)
        selected_tokens += int(store.lengths[part.docs].sum(dtype=np.int64))
        for reason in ("min_doc_tokens", "heldout", "license") + tuple(k for k in part.dropped if k.startswith("where:")):
            by_filter[reason] = by_filter.get(reason, 0) + part.dropped.get(reason, 0)
    kept = prepared - sum(by_filter.values())
    out = {
        "documents_prepared": prepared, "tokens_prepared": tokens_prepared,
        "removed_by_filters": {k: v for k, v in by_filter.items() if v}, "documents_kept": kept,
        "documents_this_stage": selected_docs, "tokens_this_stage": selected_tokens,
    }  # fmt: skip
    if totals:
        drops = store.prepare_counts()
        bad_records = sum(drops.get(k, 0) for k in ("invalid_utf8", "malformed_json", "missing_field"))
        out = {"raw_bytes": totals["raw_bytes"], "records_read": totals["records"], "documents_read": totals["documents_read"],
               "dropped_at_prepare": {k: v for k, v in drops.items() if v}, **out}  # fmt: skip
        checks = [
            ("records read", totals["records"], totals["documents_read"] + bad_records, "documents read + bad records"),
            ("documents read", totals["documents_read"], totals["documents"] + drops.get("dropped_short", 0),
             "documents in shards + dropped_short"),
            ("documents in the manifest", totals["documents"], prepared, "documents in the index"),
            ("tokens in the manifest", totals["tokens"], tokens_prepared, "tokens in the index"),
        ]  # fmt: skip
        for what, have, want, of in checks:
            if have != want:
                raise ConfigError(
                    f"data_mix.sources.{name}: {what} {have:,} != {of} {want:,}: documents went missing in the "
                    f"prepared data at {store_path(store)}; prepare it again into a new directory"
                )
    return out


def store_identity(store: DocumentStore) -> str:
    """What the source's documents are: a prepared index's digest of its shards (recorded at
    prepare time: nothing is read), else a digest of every document's length and content key."""
    manifest = getattr(store, "manifest", None)
    if manifest is not None:
        return manifest["index"]["of"]
    digest = hashlib.blake2b(np.ascontiguousarray(store.lengths, np.int64).tobytes(), digest_size=16)
    digest.update(np.ascontiguousarray(store.keys, np.uint16).tobytes())
    return digest.hexdigest()


def store_path(store: DocumentStore) -> str:
    return getattr(store, "root", "(built-in corpus)")


def _log_table(rows: list[dict], seq_len: int) -> None:
    """The mixture as one table in the log: what each part holds, weighs and lost."""
    header = f"{'part':<32} {'configured':>10} {'weight':>8} {'documents':>10} {'tokens':>14} {'seqs@' + str(seq_len):>10}  dropped"
    lines = [header]
    for r in rows:
        dropped = ", ".join(f"{k} {v}" for k, v in r["dropped"].items()) or "-"
        lines.append(
            f"{r['part']:<32} {r['configured_weight']:>10.4f} {r['weight']:>8.4f} {r['documents']:>10,} "
            f"{r['tokens']:>14,} {r['sequences']:>10,}  {dropped}{'  SKIPPED' if 'skipped' in r else ''}"
        )
    log.info("data mixture:\n%s", "\n".join(lines))
