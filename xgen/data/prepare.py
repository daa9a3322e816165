"""`task=prepare`: raw files -> tokenized shards plus a manifest and index per source.

The layout written is `xgen.data.shards`'; the units of work and what each writes are
`xgen.data.units`'; where they run is `xgen.data.engine`'s. This module is the driver: it
plans the units, runs those not yet done, and assembles the manifest from completed units
only, in document order (input path, then byte offset), so the result never depends on the
engine, the number of workers, retries or restarts.

A file is known by its content, digested while its units read it (no second read): a file
whose content is already prepared is not prepared twice (`data_dir=data` against
`$PWD/data`, a renamed or copied file, a copied prepared folder), a file whose content
changed is prepared again (its old shards go), and a file no longer matched by
`raw.paths` leaves the data. An unchanged file is recognised without reading it, by its
size and the store's identity (modification time, ETag, crc32c) cached in the manifest.

While units are outstanding the manifest says `complete: false`, and training refuses the
source; a rerun runs only the units without a completion record.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

from xgen.config import ConfigError, DataMixConfig, PrepareConfig, RawInputConfig, SourceConfig
from xgen.data import storage
from xgen.data.engine import engine_session, run_units
from xgen.data.inputs import RawFile, source_files
from xgen.data.shards import (
    MANIFEST,
    build_index,
    check_files,
    check_tokenizer,
    index_key,
    new_manifest,
    ordered_shards,
    raw_identity,
    read_json,
    summarize,
    write_json,
)
from xgen.data.units import Unit, UnitJob, plan_units, record_path
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _open_manifest(
    name: str, root: str, spec: RawInputConfig, tokenizer: Tokenizer, min_doc_tokens: int, opts: PrepareConfig
) -> dict:
    """The manifest to continue, or a new one; data prepared differently is refused."""
    path = storage.join(root, MANIFEST)
    if not storage.exists(path):
        return new_manifest(name, tokenizer, spec, min_doc_tokens, opts.count_tokens_by, opts.split_bytes)
    manifest = read_json(path)
    check_tokenizer(manifest, tokenizer, root)
    ours = (raw_identity(spec), min_doc_tokens, opts.split_bytes)
    theirs = (manifest["raw"], manifest["min_doc_tokens"], manifest["split_bytes"])
    if ours != theirs:
        raise ConfigError(
            f"{root} was prepared with raw={theirs[0]}, min_doc_tokens={theirs[1]} and prepare.split_bytes={theirs[2]}, "
            f"this run says raw={ours[0]}, min_doc_tokens={ours[1]} and prepare.split_bytes={ours[2]}; "
            "prepare into another directory"
        )
    return manifest


def _progress(name: str, total: int):
    """A function to call per finished unit: logs a line every 10 s (and at the end) with
    units done and the read rate."""
    t0 = last = time.perf_counter()
    state = {"units": 0, "bytes": 0, "tokens": 0}

    def tick(record: dict) -> None:
        nonlocal last
        state["units"] += 1
        state["bytes"] += record["counts"].get("raw_bytes", 0)
        state["tokens"] += record["tokens"]
        now = time.perf_counter()
        if now - last >= 10 or state["units"] == total:
            last = now
            log.info(
                "prepare %s: %d/%d units, %.1f MB read at %.2f MB/s, %d tokens",
                name, state["units"], total, state["bytes"] / 1e6, state["bytes"] / 1e6 / max(now - t0, 1e-9), state["tokens"],
            )  # fmt: skip

    return tick


def _file_entry(records: list[dict]) -> tuple[str, dict]:
    """(content digest, manifest entry) of one file from its units' records, in range order."""
    records = sorted(records, key=lambda r: r["index"])
    if len(records) == 1:
        digest = records[0]["digest"]
    else:
        digest = hashlib.blake2b("".join(r["digest"] for r in records).encode(), digest_size=16).hexdigest()
    counts: Counter = Counter()
    tokens_by: dict[str, Counter] = {}
    dropped_by: dict[str, Counter] = {}
    for r in records:
        counts.update(r["counts"])
        for f, c in r["tokens_by"].items():
            tokens_by.setdefault(f, Counter()).update(c)
        for f, c in r["dropped_short_by"].items():
            dropped_by.setdefault(f, Counter()).update(c)
    return digest, {
        "paths": [records[0]["path"]],
        "units": [r["id"] for r in records],
        "shards": [s for r in records for s in r["shards"]],
        "documents": sum(r["documents"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "counts": dict(sorted(counts.items())),
        "tokens_by": {f: dict(sorted(c.items())) for f, c in tokens_by.items()},
        "dropped_short_by": {f: dict(sorted(c.items())) for f, c in dropped_by.items() if c},
    }


def _drop_damaged(name: str, root: str, manifest: dict) -> bool:
    """Forget files whose shards are missing or damaged (the check training makes), with their
    units' records, so that they are prepared again; whether an index file is damaged. A file
    whose raw data is gone cannot be redone: that is an error, never a smaller corpus."""
    if not manifest["files"]:
        return False
    bad = check_files(root, manifest, record=False)
    bad_units = {entry["name"].rsplit("-", 1)[0] for folder, entry, _ in bad if folder == "shards"}
    for digest, entry in list(manifest["files"].items()):
        if not bad_units & set(entry["units"]):
            continue
        if not any(storage.exists(p) for p in entry["paths"]):
            raise ConfigError(
                f"data_mix.sources.{name}: shards of {entry['paths'][0]} in {root} are missing or damaged and the raw "
                "file is gone: restore it (or the shards) to prepare it again"
            )
        log.warning("prepare %s: %s has missing or damaged shards: preparing it again", name, entry["paths"][0])
        for unit in entry["units"]:
            storage.remove(record_path(root, unit))
        del manifest["files"][digest]
    return any(folder == "index" for folder, _, _ in bad)


def _done_records(root: str, units: list[Unit]) -> dict[str, dict]:
    """Completion records of planned units left by an earlier (interrupted) run."""
    listed = storage.listing(storage.join(root, "units"))
    return {u.id: read_json(record_path(root, u.id)) for u in units if f"{u.id}.json" in listed}


def _remove_unreferenced(root: str, manifest: dict, keep_units: set[str]) -> None:
    """Delete shards, records and staging folders that neither the manifest nor a unit
    still to be assembled names: an interrupted unit's output, a changed file's old shards."""
    names = {s["name"] for s in ordered_shards(manifest)}
    units = {u for e in manifest["files"].values() for u in e["units"]} | keep_units
    shard_dir, unit_dir = storage.join(root, "shards"), storage.join(root, "units")
    for file in storage.listing(shard_dir):
        stem = file.split(".")[0]
        if stem not in names and stem.rsplit("-", 1)[0] not in units:
            storage.remove(storage.join(shard_dir, file))
    for file in storage.listing(unit_dir):
        if file.removesuffix(".json") not in units:
            storage.remove(storage.join(unit_dir, file))
    if not storage.is_url(root):
        for stage in Path(shard_dir).glob(".stage-*"):
            shutil.rmtree(stage, ignore_errors=True)


def prepare_source(
    name: str, out_dir: str | Path, spec: RawInputConfig, tokenizer: Tokenizer, min_doc_tokens: int, opts: PrepareConfig
) -> dict:
    """Prepare every not-yet-done unit of one source; returns the manifest's totals."""
    root = str(out_dir)
    storage.makedirs(root)
    manifest = _open_manifest(name, root, spec, tokenizer, min_doc_tokens, opts)
    index_damaged = _drop_damaged(name, root, manifest)
    expanded = source_files(name, spec)
    for link in expanded.dangling_symlinks:
        log.warning("prepare %s: %s is a dangling symlink: skipped", name, link)
    stats = {f.path: storage.stat(f.path) for f in expanded.files}
    cache = manifest["stat_cache"]
    digests: dict[str, str] = {}  # path -> content digest, for every current input
    todo: list[RawFile] = []
    for f in expanded.files:
        hit = cache.get(f.path)
        if hit is not None and hit[:2] == list(stats[f.path]) and hit[2] in manifest["files"]:
            digests[f.path] = hit[2]
        else:
            todo.append(f)
    units = [u for f in todo for u in plan_units(f.path, f.parts, stats[f.path], spec, opts.split_bytes)]
    records = _done_records(root, units)
    jobs = [_job(u, root, spec, min_doc_tokens, manifest, opts, tokenizer) for u in units if u.id not in records]
    log.info(
        "prepare %s: %d files, %d already prepared; %d units to run, %d done by an earlier run (engine=%s, workers=%d)",
        name, len(expanded.files), len(digests), len(jobs), len(records), opts.engine, opts.workers,
    )  # fmt: skip
    if jobs:
        manifest["complete"], manifest["pending"] = False, sorted(j.unit.id for j in jobs)
        write_json(storage.join(root, MANIFEST), manifest)  # training refuses the source until the end
        _remove_unreferenced(root, manifest, {u.id for u in units})
    tick = _progress(name, len(jobs))
    for record in run_units(jobs, opts):
        records[record["id"]] = record
        tick(record)
    _assemble(name, manifest, expanded, todo, units, records, digests, stats)
    if index_damaged or manifest.get("index", {}).get("of") != index_key(manifest):
        manifest["index"] = build_index(root, manifest)
    manifest["totals"] = summarize(manifest)
    manifest["complete"], manifest["pending"] = True, []
    write_json(storage.join(root, MANIFEST), manifest)
    _remove_unreferenced(root, manifest, set())
    totals = manifest["totals"]
    if not totals.get("documents"):
        problems = {k: v for k, v in totals.items() if isinstance(v, int) and v and k not in ("files", "shards", "units", "raw_bytes")}
        raise ConfigError(
            f"data_mix.sources.{name}: {totals['files']} files under {spec.paths} gave no document ({problems}); "
            f"check raw.text_field={spec.text_field!r} and raw.format"
        )
    return totals


def _job(
    unit: Unit, root: str, spec: RawInputConfig, min_doc_tokens: int, manifest: dict, opts: PrepareConfig, tokenizer: Tokenizer
) -> UnitJob:  # fmt: skip
    return UnitJob(
        unit, root, spec, min_doc_tokens, tuple(manifest["meta_fields"]), tuple(manifest["count_tokens_by"]),
        opts.shard_tokens, opts.batch_documents, manifest["token_dtype"], tokenizer.encoding.name,
    )  # fmt: skip


def _assemble(
    name: str, manifest: dict, expanded, todo: list[RawFile], units: list[Unit], records: dict[str, dict],
    digests: dict[str, str], stats: dict,
) -> None:  # fmt: skip
    """Fold the new files' units into the manifest: a content already there gains a path
    (renamed or copied), a changed file's old entry goes, a file no longer matched leaves."""
    by_path: dict[str, list[dict]] = {}
    for u in units:
        by_path.setdefault(u.path, []).append(records[u.id])
    new: dict[str, dict] = {}
    for f in todo:  # in path order: the first of several identical files is the one kept
        digest, entry = _file_entry(by_path[f.path])
        digests[f.path] = digest
        if digest in manifest["files"] or digest in new:
            continue
        new[digest] = entry
    current = set(digests.values())
    for digest, entry in list(manifest["files"].items()):
        if digest in current:
            continue
        changed = [p for p in entry["paths"] if p in digests]
        unmatched = [p for p in entry["paths"] if p not in digests and storage.exists(p)]
        if changed:
            log.warning("prepare %s: %s changed since it was prepared: preparing it again", name, changed[0])
        elif unmatched:
            log.warning("prepare %s: %s is no longer in raw.paths: its documents are removed", name, unmatched[0])
        else:
            continue  # raw data deleted once prepared: its documents stay
        del manifest["files"][digest]
    manifest["files"].update(new)
    for path, digest in digests.items():
        paths = manifest["files"][digest]["paths"]
        if path not in paths:
            paths.append(path)  # the same content under another name: nothing to redo
            paths.sort()
    copies = Counter(digests.values())
    for path in sorted(digests):
        if copies[digests[path]] > 1 and manifest["files"][digests[path]]["paths"][0] != path:
            log.warning("prepare %s: %s has the same content as another input: its documents are kept once", name, path)
    manifest["stat_cache"] = {p: [*stats[p], digests[p]] for p in sorted(digests)}
    skipped = {"dangling_symlinks": len(expanded.dangling_symlinks), "duplicate_files": len(digests) - len(current)}
    manifest["skipped"] = {k: v for k, v in skipped.items() if v}


def sources_to_prepare(mix: DataMixConfig) -> dict[str, SourceConfig]:
    """The sources `prepare` writes, by name: those with kind=prepared and raw inputs, one per
    prepared `path` (subsets of one release selected by `where` share it and are prepared
    once); sources sharing a path but reading their raw files differently are refused."""
    todo = {name: src for name, src in mix.sources.items() if src.kind == "prepared" and src.raw is not None}
    if not todo:
        raise ConfigError(f"data_mix={mix.name} has no source with kind=prepared and raw inputs to prepare")
    by_path: dict[str, str] = {}
    for name, src in todo.items():
        first = by_path.setdefault(src.path, name)
        same = (raw_identity(todo[first].raw), list(todo[first].raw.paths)) == (raw_identity(src.raw), list(src.raw.paths))
        if not same:
            raise ConfigError(f"data_mix.sources.{first} and .{name} share path {src.path} but read their raw files differently")
    return {name: todo[name] for name in by_path.values()}


def prepare_mix(mix: DataMixConfig, tokenizer: Tokenizer, opts: PrepareConfig) -> dict[str, dict]:
    """Prepare every source of the mixture that names raw inputs (`sources_to_prepare`)."""
    todo = sources_to_prepare(mix)
    with engine_session(opts):  # one Ray for all sources
        return {name: prepare_source(name, src.path, src.raw, tokenizer, mix.min_doc_tokens, opts) for name, src in todo.items()}
