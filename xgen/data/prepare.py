"""`task=prepare`: raw files -> tokenized ArrayRecord shards plus a manifest per source.

Layout of a prepared source directory (the source's `path`):

    manifest.json                         what is in it: files done, documents, tokens,
                                          drop and error counts, tokenizer identity
    shards/<file-hash>-<part>.array_record one record per document (uint16 token ids)
    shards/<file-hash>-<part>.index.npz   per-document token counts and metadata, so that
                                          mixing and filtering never read the tokens

Work is committed one input file at a time: a file's shards are written under temporary
names, renamed when the file is complete, and only then recorded in the manifest (written
atomically). Running `prepare` again skips recorded files and deletes any shard that the
manifest does not name, so an interrupted run neither loses nor duplicates a document.
Tokenization runs in worker processes with a bounded number of batches in flight, so
memory stays flat however large the input.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from xgen.config import ConfigError, DataMixConfig, PrepareConfig, RawInputConfig
from xgen.data.readers import read_documents
from xgen.tokenizer import Tokenizer
from xgen.tokenizer.xgen import encode_to_arrays

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "xgen-shards-v1"


def expand_paths(patterns: list[str]) -> list[str]:
    """Sorted files matching the patterns (local globs or fsspec URLs)."""
    files: set[str] = set()
    for pattern in patterns:
        if "://" in pattern:
            try:
                fs, _, paths = fsspec.get_fs_token_paths(pattern)
            except (ImportError, ValueError) as ex:  # e.g. gs:// without gcsfs installed
                raise ConfigError(f"raw input {pattern}: {ex}")
            files.update(fs.unstrip_protocol(p) for p in paths)
        else:
            files.update(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    return sorted(files)


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def new_manifest(
    name: str, tokenizer: Tokenizer, spec: RawInputConfig, min_doc_tokens: int, count_by: list[str]
) -> dict:
    return {
        "format": FORMAT,
        "source": name,
        "tokenizer": {"identity": tokenizer.identity, "n_tokens": tokenizer.n_tokens},
        "token_dtype": "uint16" if tokenizer.n_tokens <= 2**16 else "uint32",
        "min_doc_tokens": min_doc_tokens,
        "meta_fields": list(spec.meta_fields),
        "count_tokens_by": [f for f in count_by if f in spec.meta_fields],
        "files": {},
    }


def summarize(manifest: dict) -> dict:
    """Totals over the manifest's files: documents, tokens, shards, counts, tokens by metadata."""
    totals: Counter = Counter()
    by: dict[str, Counter] = {f: Counter() for f in manifest["count_tokens_by"]}
    for entry in manifest["files"].values():
        totals.update({k: entry[k] for k in ("documents", "tokens")})
        totals["shards"] += len(entry["shards"])
        totals.update(entry["counts"])
        for f, counts in entry["tokens_by"].items():
            by[f].update(counts)
    return {**dict(sorted(totals.items())), "files": len(manifest["files"]), "tokens_by": {f: dict(c) for f, c in by.items()}}


@dataclass
class _ShardWriter:
    """Writes one input file's documents into numbered shards under temporary names."""

    directory: Path
    stem: str
    shard_tokens: int
    meta_fields: list[str]
    done: list[str] = field(default_factory=list)
    part: int = 0
    _writer: ArrayRecordWriter | None = None
    _lengths: list[int] = field(default_factory=list)
    _meta: dict[str, list[str]] = field(default_factory=dict)
    _tokens: int = 0

    def _name(self) -> str:
        return f"{self.stem}-{self.part:04d}"

    def write(self, tokens: np.ndarray, meta: dict[str, str]) -> None:
        if self._writer is None:
            self._writer = ArrayRecordWriter(str(self.directory / f"{self._name()}.array_record.tmp"), "group_size:1")
            self._lengths, self._tokens = [], 0
            self._meta = {f: [] for f in self.meta_fields}
        self._writer.write(tokens.tobytes())
        self._lengths.append(len(tokens))
        for f in self.meta_fields:
            self._meta[f].append(meta.get(f, ""))
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self.close_shard()

    def close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        arrays = {"lengths": np.asarray(self._lengths, np.int64)}
        arrays.update({f"meta_{f}": np.asarray(v, dtype=str) for f, v in self._meta.items()})
        with open(self.directory / f"{self._name()}.index.npz.tmp", "wb") as fh:
            np.savez(fh, **arrays)
        self.done.append(self._name())
        self._writer = None
        self.part += 1

    def commit(self) -> list[str]:
        """Close the open shard and give every shard of this file its final name."""
        self.close_shard()
        for name in self.done:
            for suffix in (".array_record", ".index.npz"):
                os.replace(self.directory / f"{name}{suffix}.tmp", self.directory / f"{name}{suffix}")
        return self.done


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
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        check_tokenizer(manifest, tokenizer, out_dir)
    else:
        manifest = new_manifest(name, tokenizer, spec, min_doc_tokens, opts.count_tokens_by)
    keep = {s for entry in manifest["files"].values() for s in entry["shards"]}
    for leftover in shard_dir.iterdir():
        if leftover.name.split(".")[0] not in keep:
            leftover.unlink()  # from an interrupted run: its file is redone below
    files = expand_paths(spec.paths)
    if not files:
        raise ConfigError(f"data_mix.sources.{name}.raw.paths {spec.paths} match no file")
    todo = [f for f in files if f not in manifest["files"]]
    log.info("prepare %s: %d files, %d already done, %d to do", name, len(files), len(files) - len(todo), len(todo))
    for path in todo:
        t0 = time.perf_counter()
        counts: Counter = Counter()
        stem = hashlib.sha1(path.encode()).hexdigest()[:12]
        writer = _ShardWriter(shard_dir, stem, opts.shard_tokens, list(spec.meta_fields))
        tokens_by: dict[str, Counter] = {f: Counter() for f in manifest["count_tokens_by"]}
        documents = tokens = 0
        batches = _batched(read_documents(path, spec, counts), opts.batch_documents)
        for arrays, metas in _encoded(batches, pool, max_in_flight=2 * max(opts.workers, 1)):
            for ids, meta in zip(arrays, metas):
                if len(ids) < min_doc_tokens:
                    counts["dropped_short"] += 1
                    continue
                writer.write(ids, meta)
                documents += 1
                tokens += len(ids)
                for f, by_value in tokens_by.items():
                    by_value[meta.get(f, "")] += len(ids)
        manifest["files"][path] = {
            "shards": writer.commit(),
            "documents": documents,
            "tokens": tokens,
            "counts": dict(counts),
            "tokens_by": {f: dict(c) for f, c in tokens_by.items()},
        }
        manifest["totals"] = summarize(manifest)
        _write_json_atomically(manifest_path, manifest)
        log.info(
            "prepare %s: %s: %d documents, %d tokens in %.1f s; %s",
            name, path, documents, tokens, time.perf_counter() - t0, dict(counts),
        )  # fmt: skip
    manifest["totals"] = summarize(manifest)
    _write_json_atomically(manifest_path, manifest)
    return manifest["totals"]


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, where: Path) -> None:
    """Refuse data tokenized with another tokenizer, in one line."""
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{where}/{MANIFEST}: format {manifest.get('format')!r} is not {FORMAT!r}")
    theirs = manifest["tokenizer"]["identity"]
    if theirs != tokenizer.identity:
        raise ConfigError(
            f"{where} was tokenized with tokenizer {theirs}, but this run uses {tokenizer.identity}; "
            "prepare it again into another directory"
        )


def prepare_mix(mix: DataMixConfig, tokenizer: Tokenizer, opts: PrepareConfig) -> dict[str, dict]:
    """Prepare every source of the mixture that names raw inputs."""
    todo = {name: src for name, src in mix.sources.items() if src.kind == "prepared" and src.raw is not None}
    if not todo:
        raise ConfigError(f"data_mix={mix.name} has no source with kind=prepared and raw inputs to prepare")
    with worker_pool(opts.workers) as pool:
        return {
            name: prepare_source(name, Path(src.path), src.raw, tokenizer, mix.min_doc_tokens, opts, pool)
            for name, src in todo.items()
        }
