"""The prepared-source layout: shards of token records, their indexes, and the manifest.

    manifest.json                            what is in it: input files done (by content),
                                             documents, tokens, drop and error counts,
                                             tokenizer identity
    shards/<content-hash>-<part>.array_record a document as records of at most CHUNK_TOKENS
                                             uint16 token ids, so a window of a long
                                             document reads only the chunks it covers
    shards/<content-hash>-<part>.index.npz   per-document token counts, record counts and
                                             metadata, so mixing and filtering never read
                                             the tokens

`prepare` writes it from raw files, `write_token_documents` from token ids, `ShardStore`
reads it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from xgen.config import ConfigError, RawInputConfig
from xgen.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT = "xgen-shards-v2"
CHUNK_TOKENS = 1 << 15  # tokens per record: 64 KiB of uint16, a few windows of 8K


def write_json_atomically(path: Path, data: dict) -> None:
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
        "raw": raw_identity(spec),
        "meta_fields": list(spec.meta),
        "count_tokens_by": [f for f in count_by if f in spec.meta],
        "files": {},
        "stat_cache": {},
    }


def raw_identity(spec: RawInputConfig) -> dict:
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
class ShardWriter:
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


def write_token_documents(out_dir: Path, name: str, documents: Iterable[np.ndarray], tokenizer: Tokenizer) -> dict:
    """A prepared source from documents that are token ids already (no raw file, no
    tokenizing): pre-tokenized corpora, and benchmarks that need a document of a given size."""
    shard_dir = Path(out_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(name, tokenizer, RawInputConfig(), 0, [])
    dtype = np.dtype(manifest["token_dtype"])
    writer = ShardWriter(shard_dir, "tokens", 50_000_000, [])
    lengths = []
    for doc in documents:
        writer.write(np.asarray(doc, dtype), {})
        lengths.append(len(doc))
    manifest["files"]["tokens"] = {
        "paths": [], "shards": writer.commit(), "documents": len(lengths), "tokens": int(sum(lengths)),
        "counts": {}, "tokens_by": {},
    }  # fmt: skip
    manifest["totals"] = summarize(manifest)
    write_json_atomically(Path(out_dir) / MANIFEST, manifest)
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
