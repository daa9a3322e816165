"""`task=prepare`: raw files -> tokenized ArrayRecord shards plus a manifest per source.

Layout of a prepared source directory (the source's `path`):

    manifest.json                            what is in it: input files done (by content),
                                             documents, tokens, drop and error counts,
                                             tokenizer identity
    shards/<content-hash>-<part>.array_record a document as records of at most CHUNK_TOKENS
                                             uint16 token ids, so a window of a long
                                             document reads only the chunks it covers
    shards/<content-hash>-<part>.index.npz   per-document token counts, record counts and
                                             metadata, so mixing and filtering never read
                                             the tokens

Input files are identified by their content (a BLAKE2 hash, cached by path, size and
modification time), not by the path string: `data_dir=data` and `data_dir=$PWD/data`, a
renamed raw file, a copied file or a copied prepared folder never duplicate a document,
and a file whose content changed since it was prepared is prepared again (its old shards
go). Work is committed one input file at a time: a file's shards are written under
temporary names, renamed when the file is complete, and only then recorded in the manifest
(written atomically). Running `prepare` again skips recorded files and deletes any shard
that the manifest does not name, so an interrupted run neither loses nor duplicates a
document.
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
from typing import Any, Iterable, Iterator, NamedTuple

import fsspec
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from xgen.config import ConfigError, DataMixConfig, PrepareConfig, RawInputConfig
from xgen.data.readers import read_documents
from xgen.tokenizer import Tokenizer
from xgen.tokenizer.xgen import encode_to_arrays

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "xgen-shards-v2"
CHUNK_TOKENS = 1 << 15  # tokens per record: 64 KiB of uint16, a few windows of 8K
_WILDCARDS = set("*?[")


class RawFile(NamedTuple):
    path: str  # local real path, or an fsspec URL
    parts: tuple[str, ...]  # the path below its pattern's fixed prefix (for `path:N` metadata)


@dataclass
class Expanded:
    files: list[RawFile]
    dangling_symlinks: list[str]


def _fixed_prefix(pattern: str) -> str:
    """The folders of a glob pattern before its first wildcard."""
    kept = []
    for part in pattern.split("/")[:-1]:
        if _WILDCARDS & set(part):
            break
        kept.append(part)
    return "/".join(kept)


def _parts_below(path: str, prefix: str) -> tuple[str, ...]:
    rel = path[len(prefix) :].lstrip("/") if prefix and path.startswith(prefix) else path
    return tuple(p for p in rel.split("/") if p)


def expand_paths(patterns: list[str]) -> Expanded:
    """Files matching the patterns (local globs or fsspec URLs), sorted, each once, and the
    dangling symlinks among the matches (counted, never silently skipped)."""
    found: dict[str, tuple[str, ...]] = {}
    dangling: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            try:
                fs, _, paths = fsspec.get_fs_token_paths(pattern)
            except (ImportError, ValueError) as ex:  # e.g. gs:// without gcsfs installed
                raise ConfigError(f"raw input {pattern}: {ex}")
            prefix = _fixed_prefix(pattern)
            for p in paths:
                url = fs.unstrip_protocol(p)
                found.setdefault(url, _parts_below(url, prefix))
            continue
        pattern = os.path.expanduser(pattern)
        prefix = os.path.abspath(_fixed_prefix(pattern) or ".")
        for match in glob.glob(pattern, recursive=True):
            if os.path.islink(match) and not os.path.exists(match):
                dangling.append(match)
            elif os.path.isfile(match):
                found.setdefault(os.path.realpath(match), _parts_below(os.path.abspath(match), prefix))
    return Expanded([RawFile(p, found[p]) for p in sorted(found)], sorted(set(dangling)))


def _stat_key(path: str) -> list:
    """What says a file is unchanged without reading it: size and modification time."""
    if "://" in path:
        fs, _, (p,) = fsspec.get_fs_token_paths(path)
        info = fs.info(p)
        return [info.get("size"), str(info.get("mtime") or info.get("updated") or info.get("etag") or "")]
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def content_digest(path: str) -> str:
    """BLAKE2b-128 of the file's bytes: the file's identity in a manifest."""
    h = hashlib.blake2b(digest_size=16)
    with fsspec.open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _digest_cached(path: str, cache: dict[str, list]) -> str:
    key = _stat_key(path)
    hit = cache.get(path)
    if hit is not None and hit[:-1] == key:
        return hit[-1]
    digest = content_digest(path)
    cache[path] = [*key, digest]
    return digest


def _exists(path: str) -> bool:
    if "://" in path:
        fs, _, (p,) = fsspec.get_fs_token_paths(path)
        return fs.exists(p)
    return os.path.exists(path)


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
        "chunk_tokens": CHUNK_TOKENS,
        "min_doc_tokens": min_doc_tokens,
        "raw": _raw_identity(spec),
        "meta_fields": list(spec.meta),
        "count_tokens_by": [f for f in count_by if f in spec.meta],
        "files": {},
        "stat_cache": {},
    }


def _raw_identity(spec: RawInputConfig) -> dict:
    """What decides the documents a file gives: a change means preparing into a new folder."""
    return {"text_field": spec.text_field, "meta": dict(spec.meta), "format": spec.format}


def summarize(manifest: dict) -> dict:
    """Totals over the manifest's files: documents, tokens, shards, counts, tokens by metadata."""
    totals: Counter = Counter()
    by: dict[str, Counter] = {f: Counter() for f in manifest["count_tokens_by"]}
    dropped_by: dict[str, Counter] = {f: Counter() for f in manifest["count_tokens_by"]}
    for entry in manifest["files"].values():
        totals.update({k: entry[k] for k in ("documents", "tokens")})
        totals["shards"] += len(entry["shards"])
        totals.update(entry["counts"])
        for f, counts in entry["tokens_by"].items():
            by[f].update(counts)
        for f, counts in entry.get("dropped_short_by", {}).items():
            dropped_by[f].update(counts)
    totals.update(manifest.get("skipped", {}))
    return {
        **dict(sorted(totals.items())),
        "files": len(manifest["files"]),
        "tokens_by": {f: dict(c) for f, c in by.items()},
        "dropped_short_by": {f: dict(c) for f, c in dropped_by.items()},
    }


@dataclass
class _ShardWriter:
    """Writes one input file's documents into numbered shards under temporary names; a
    document is `ceil(len / CHUNK_TOKENS)` consecutive records."""

    directory: Path
    stem: str
    shard_tokens: int
    meta_fields: list[str]
    chunk_tokens: int = CHUNK_TOKENS
    done: list[str] = field(default_factory=list)
    part: int = 0
    _writer: ArrayRecordWriter | None = None
    _lengths: list[int] = field(default_factory=list)
    _records: list[int] = field(default_factory=list)
    _meta: dict[str, list[str]] = field(default_factory=dict)
    _tokens: int = 0

    def _name(self) -> str:
        return f"{self.stem}-{self.part:04d}"

    def write(self, tokens: np.ndarray, meta: dict[str, str]) -> None:
        if self._writer is None:
            self._writer = ArrayRecordWriter(str(self.directory / f"{self._name()}.array_record.tmp"), "group_size:1")
            self._lengths, self._records, self._tokens = [], [], 0
            self._meta = {f: [] for f in self.meta_fields}
        starts = range(0, max(len(tokens), 1), self.chunk_tokens)
        for start in starts:
            self._writer.write(tokens[start : start + self.chunk_tokens].tobytes())
        self._lengths.append(len(tokens))
        self._records.append(len(starts))
        for f in self.meta_fields:
            self._meta[f].append(meta.get(f, ""))
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self.close_shard()

    def close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        arrays = {"lengths": np.asarray(self._lengths, np.int64), "records": np.asarray(self._records, np.int64)}
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


def _open_manifest(
    name: str, out_dir: Path, spec: RawInputConfig, tokenizer: Tokenizer, min_doc_tokens: int, opts: PrepareConfig
) -> dict:
    """The manifest to continue, or a new one; data prepared differently is refused."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.exists():
        return new_manifest(name, tokenizer, spec, min_doc_tokens, opts.count_tokens_by)
    manifest = json.loads(manifest_path.read_text())
    check_tokenizer(manifest, tokenizer, out_dir)
    if manifest["raw"] != _raw_identity(spec) or manifest["min_doc_tokens"] != min_doc_tokens:
        raise ConfigError(
            f"{out_dir} was prepared with raw={manifest['raw']} and min_doc_tokens={manifest['min_doc_tokens']}, "
            f"this data_mix says raw={_raw_identity(spec)} and min_doc_tokens={min_doc_tokens}; "
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
    digests = {f.path: _digest_cached(f.path, cache) for f in expanded.files}
    gone = 0
    for digest, entry in list(manifest["files"].items()):
        if digest in digests.values():
            continue
        changed = [p for p in entry["paths"] if p in digests]
        unmatched = [p for p in entry["paths"] if p not in digests and _exists(p)]
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
        _write_json_atomically(out_dir / MANIFEST, manifest)
        entry = manifest["files"][digest]
        log.info(
            "prepare %s: %s: %d documents, %d tokens in %.1f s; %s",
            name, raw_file.path, entry["documents"], entry["tokens"], time.perf_counter() - t0, entry["counts"],
        )  # fmt: skip
    manifest["totals"] = summarize(manifest)
    _write_json_atomically(out_dir / MANIFEST, manifest)
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
    writer = _ShardWriter(shard_dir, digest[:16], opts.shard_tokens, list(spec.meta))
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


def write_token_documents(out_dir: Path, name: str, documents: Iterable[np.ndarray], tokenizer: Tokenizer) -> dict:
    """A prepared source from documents that are token ids already (no raw file, no
    tokenizing): pre-tokenized corpora, and benchmarks that need a document of a given size."""
    shard_dir = Path(out_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(name, tokenizer, RawInputConfig(), 0, [])
    dtype = np.dtype(manifest["token_dtype"])
    writer = _ShardWriter(shard_dir, "tokens", 50_000_000, [])
    lengths = []
    for doc in documents:
        writer.write(np.asarray(doc, dtype), {})
        lengths.append(len(doc))
    manifest["files"]["tokens"] = {
        "paths": [], "shards": writer.commit(), "documents": len(lengths), "tokens": int(sum(lengths)),
        "counts": {}, "tokens_by": {},
    }  # fmt: skip
    manifest["totals"] = summarize(manifest)
    _write_json_atomically(Path(out_dir) / MANIFEST, manifest)
    return manifest["totals"]


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, where: Path) -> None:
    """Refuse data tokenized with another tokenizer, or in another layout, in one line."""
    if manifest.get("format") != FORMAT:
        raise ConfigError(
            f"{where}/{MANIFEST}: format {manifest.get('format')!r} is not {FORMAT!r}; prepare it again into another directory"
        )
    theirs = manifest["tokenizer"]["identity"]
    if theirs != tokenizer.identity:
        raise ConfigError(
            f"{where} was tokenized with tokenizer {theirs}, but this run uses {tokenizer.identity}; "
            "prepare it again into another directory"
        )


def prepare_mix(mix: DataMixConfig, tokenizer: Tokenizer, opts: PrepareConfig) -> dict[str, dict]:
    """Prepare every source of the mixture that names raw inputs. Sources that share a
    prepared `path` (subsets of one release selected by `where`) are prepared once."""
    todo = {name: src for name, src in mix.sources.items() if src.kind == "prepared" and src.raw is not None}
    if not todo:
        raise ConfigError(f"data_mix={mix.name} has no source with kind=prepared and raw inputs to prepare")
    by_path: dict[str, str] = {}
    for name, src in todo.items():
        first = by_path.setdefault(src.path, name)
        same = (_raw_identity(todo[first].raw), list(todo[first].raw.paths)) == (_raw_identity(src.raw), list(src.raw.paths))
        if not same:
            raise ConfigError(f"data_mix.sources.{first} and .{name} share path {src.path} but read their raw files differently")
    with worker_pool(opts.workers) as pool:
        return {
            name: prepare_source(name, Path(todo[name].path), todo[name].raw, tokenizer, mix.min_doc_tokens, opts, pool)
            for name in by_path.values()
        }
