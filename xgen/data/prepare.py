"""`task=prepare`: raw files -> tokenized ArrayRecord shards plus a manifest per source.

The layout written is `xgen.data.shards`'; which files are read, and how each is known by
its content, is `xgen.data.inputs`'. A file whose content is already prepared is skipped
(`data_dir=data` against `$PWD/data`, a renamed or copied file, a copied prepared folder
never duplicate a document), a file whose content changed is prepared again (its old
shards go), and a file no longer matched by `raw.paths` leaves the data.

Work is committed one input file at a time: a file's shards are written under temporary
names, renamed when the file is complete, and only then recorded in the manifest (written
atomically). Running `prepare` again skips recorded files and deletes any shard that the
manifest does not name, so an interrupted run neither loses nor duplicates a document.
Tokenization runs in worker processes with a bounded number of batches in flight, so
memory stays flat however large the input.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from xgen.config import ConfigError, DataMixConfig, PrepareConfig, RawInputConfig
from xgen.data.inputs import RawFile, cached_digest, exists, expand_paths
from xgen.data.readers import read_documents
from xgen.data.shards import (
    MANIFEST,
    ShardWriter,
    check_tokenizer,
    new_manifest,
    raw_identity,
    summarize,
    write_json_atomically,
)
from xgen.tokenizer import Tokenizer
from xgen.tokenizer.xgen import encode_to_arrays

log = logging.getLogger(__name__)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(batches: Iterator[list], pool, max_in_flight: int) -> Iterator[tuple[list[np.ndarray], list[dict]]]:
    """(token arrays, metadata) per batch, in input order, with at most `max_in_flight` batches
    queued in the pool: reading never runs ahead of tokenizing by more than that."""
    pending: deque = deque()
    for batch in batches:
        texts = [text for text, _ in batch]
        metas = [meta for _, meta in batch]
        pending.append((pool.apply_async(encode_to_arrays, (texts,)) if pool else encode_to_arrays(texts), metas))
        while len(pending) >= max_in_flight:
            result, metas = pending.popleft()
            yield (result.get() if pool else result), metas
    while pending:
        result, metas = pending.popleft()
        yield (result.get() if pool else result), metas


@contextmanager
def worker_pool(workers: int) -> Iterator[Any]:
    """Tokenizer processes (spawned: safe even when the caller has started JAX's threads);
    None runs in-process."""
    if workers <= 0:
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def _open_manifest(
    name: str, out_dir: Path, spec: RawInputConfig, tokenizer: Tokenizer, min_doc_tokens: int, opts: PrepareConfig
) -> dict:
    """The manifest to continue, or a new one; data prepared differently is refused."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.exists():
        return new_manifest(name, tokenizer, spec, min_doc_tokens, opts.count_tokens_by)
    manifest = json.loads(manifest_path.read_text())
    check_tokenizer(manifest, tokenizer, out_dir)
    if manifest["raw"] != raw_identity(spec) or manifest["min_doc_tokens"] != min_doc_tokens:
        raise ConfigError(
            f"{out_dir} was prepared with raw={manifest['raw']} and min_doc_tokens={manifest['min_doc_tokens']}, "
            f"this data_mix says raw={raw_identity(spec)} and min_doc_tokens={min_doc_tokens}; "
            "prepare into another directory"
        )
    return manifest


def _plan_files(name: str, spec: RawInputConfig, manifest: dict) -> tuple[list[tuple[str, RawFile]], dict]:
    """(digest, file) to prepare, and what was skipped: files whose content is already
    prepared, copies of another input, dangling symlinks. Entries whose file now holds
    other content are removed (their file is prepared again); entries whose file is gone
    are kept (raw data is often deleted once prepared)."""
    expanded = expand_paths(spec.paths)
    for link in expanded.dangling_symlinks:
        log.warning("prepare %s: %s is a dangling symlink: skipped", name, link)
    if not expanded.files:
        dangling = f" ({len(expanded.dangling_symlinks)} dangling symlinks)" if expanded.dangling_symlinks else ""
        raise ConfigError(f"data_mix.sources.{name}.raw.paths {spec.paths} match no file{dangling}")
    cache = manifest.setdefault("stat_cache", {})
    digests = {f.path: cached_digest(f.path, cache) for f in expanded.files}
    gone = 0
    for digest, entry in list(manifest["files"].items()):
        if digest in digests.values():
            continue
        changed = [p for p in entry["paths"] if p in digests]
        unmatched = [p for p in entry["paths"] if p not in digests and exists(p)]
        if changed:
            log.warning("prepare %s: %s changed since it was prepared: preparing it again", name, changed[0])
        elif unmatched:
            log.warning("prepare %s: %s is no longer in raw.paths: its documents are removed", name, unmatched[0])
        else:
            gone += 1
            continue
        del manifest["files"][digest]
    if gone:
        log.info("prepare %s: kept %d prepared files whose raw files are gone", name, gone)
    todo, seen = [], set(manifest["files"])
    duplicates = len(digests) - len(set(digests.values()))  # inputs with another input's content
    for f in expanded.files:
        digest = digests[f.path]
        if digest in manifest["files"]:
            paths = manifest["files"][digest]["paths"]
            if f.path not in paths:
                paths.append(f.path)  # same content under another name: nothing to redo
            continue
        if digest in seen:
            log.warning("prepare %s: %s has the same content as another input: read once", name, f.path)
            continue
        seen.add(digest)
        todo.append((digest, f))
    skipped = {"dangling_symlinks": len(expanded.dangling_symlinks), "duplicate_files": duplicates}
    return todo, {k: v for k, v in skipped.items() if v}


def prepare_source(
    name: str,
    out_dir: Path,
    spec: RawInputConfig,
    tokenizer: Tokenizer,
    min_doc_tokens: int,
    opts: PrepareConfig,
    pool: Any = None,
) -> dict:
    """Tokenize every not-yet-done file of one source; returns the manifest's totals.
    `pool` (from `worker_pool`) is shared across sources; without one, one is started here."""
    if pool is None and opts.workers > 0:
        with worker_pool(opts.workers) as own:
            return prepare_source(name, out_dir, spec, tokenizer, min_doc_tokens, opts, own)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(name, out_dir, spec, tokenizer, min_doc_tokens, opts)
    todo, manifest["skipped"] = _plan_files(name, spec, manifest)
    keep = {s for entry in manifest["files"].values() for s in entry["shards"]}
    for leftover in shard_dir.iterdir():
        if leftover.name.split(".")[0] not in keep:
            leftover.unlink()  # from an interrupted run, or of a changed file: redone below
    done = sum(len(e["paths"]) for e in manifest["files"].values())
    log.info("prepare %s: %d files already done, %d to do, skipped %s", name, done, len(todo), manifest["skipped"] or "none")
    for digest, raw_file in todo:
        t0 = time.perf_counter()
        manifest["files"][digest] = _prepare_file(raw_file, digest, shard_dir, spec, tokenizer, min_doc_tokens, opts, manifest, pool)
        manifest["totals"] = summarize(manifest)
        write_json_atomically(out_dir / MANIFEST, manifest)
        entry = manifest["files"][digest]
        log.info(
            "prepare %s: %s: %d documents, %d tokens in %.1f s; %s",
            name, raw_file.path, entry["documents"], entry["tokens"], time.perf_counter() - t0, entry["counts"],
        )  # fmt: skip
    manifest["totals"] = summarize(manifest)
    write_json_atomically(out_dir / MANIFEST, manifest)
    totals = manifest["totals"]
    if not totals.get("documents"):
        problems = {k: v for k, v in totals.items() if isinstance(v, int) and v and k not in ("files", "shards")}
        raise ConfigError(
            f"data_mix.sources.{name}: {totals['files']} files under {spec.paths} gave no document ({problems}); "
            f"check raw.text_field={spec.text_field!r} and raw.format"
        )
    return totals


def _prepare_file(
    raw_file: RawFile, digest: str, shard_dir: Path, spec: RawInputConfig, tokenizer: Tokenizer, min_doc_tokens: int,
    opts: PrepareConfig, manifest: dict, pool: Any,
) -> dict:  # fmt: skip
    """One input file into committed shards; its manifest entry."""
    counts: Counter = Counter()
    writer = ShardWriter(shard_dir, digest[:16], opts.shard_tokens, list(spec.meta))
    fields = manifest["count_tokens_by"]
    tokens_by: dict[str, Counter] = {f: Counter() for f in fields}
    dropped_by: dict[str, Counter] = {f: Counter() for f in fields}
    documents = tokens = 0
    batches = _batched(read_documents(raw_file.path, spec, counts, raw_file.parts), opts.batch_documents)
    for arrays, metas in _encoded(batches, pool, max_in_flight=2 * max(opts.workers, 1)):
        for ids, meta in zip(arrays, metas):
            if len(ids) < min_doc_tokens:
                counts["dropped_short"] += 1
                for f in fields:
                    dropped_by[f][meta.get(f, "")] += 1
                continue
            writer.write(ids, meta)
            documents += 1
            tokens += len(ids)
            for f in fields:
                tokens_by[f][meta.get(f, "")] += len(ids)
    return {
        "paths": [raw_file.path],
        "shards": writer.commit(),
        "documents": documents,
        "tokens": tokens,
        "counts": dict(counts),
        "tokens_by": {f: dict(c) for f, c in tokens_by.items()},
        "dropped_short_by": {f: dict(c) for f, c in dropped_by.items() if c},
    }


def prepare_mix(mix: DataMixConfig, tokenizer: Tokenizer, opts: PrepareConfig) -> dict[str, dict]:
    """Prepare every source of the mixture that names raw inputs. Sources that share a
    prepared `path` (subsets of one release selected by `where`) are prepared once."""
    todo = {name: src for name, src in mix.sources.items() if src.kind == "prepared" and src.raw is not None}
    if not todo:
        raise ConfigError(f"data_mix={mix.name} has no source with kind=prepared and raw inputs to prepare")
    by_path: dict[str, str] = {}
    for name, src in todo.items():
        first = by_path.setdefault(src.path, name)
        same = (raw_identity(todo[first].raw), list(todo[first].raw.paths)) == (raw_identity(src.raw), list(src.raw.paths))
        if not same:
            raise ConfigError(f"data_mix.sources.{first} and .{name} share path {src.path} but read their raw files differently")
    with worker_pool(opts.workers) as pool:
        return {
            name: prepare_source(name, Path(todo[name].path), todo[name].raw, tokenizer, mix.min_doc_tokens, opts, pool)
            for name in by_path.values()
        }
