"""The prepared-source layout: token shards, their per-document index, and the manifest.

    manifest.json             what is in it: input files done (by content), their units,
                              every shard with its size and checksum, documents, tokens,
                              drop and error counts, tokenizer identity; `complete` is
                              true only once every unit of every input is in
    shards/<unit>-<part>.tokens      the documents' token ids, concatenated (uint16 while
                              the vocabulary fits): any token range is one ranged read
    shards/<unit>-<part>.index.npz   per-document token counts and metadata (as written
                              by the unit's worker)
    units/<unit>.json         a unit's completion record: written last, so a unit is done
                              exactly when its record exists
    index/                    the whole source's index as memory-mappable arrays, in
                              document order: `starts.npy` (int64 token offsets, n + 1),
                              `lengths.npy` (uint32) and per metadata field `meta_<f>.npy`
                              (small integer codes) with `meta_<f>.values.npy` (the values),
                              and `keys.npy` (uint16: each document's content key, which
                              decides the held-out documents: xgen.data.heldout);
                              each file's size and BLAKE2b are in the manifest, as a shard's

Document order is input file order (sorted paths), then byte offset within the file: it
never depends on which worker finished first. `prepare` writes it from raw files,
`write_token_documents` from token ids, `ShardStore` reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import fsspec
import numpy as np

from xgen.config import ConfigError, RawInputConfig
from xgen.data import storage
from xgen.data.heldout import content_key
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERIFIED = "verified.json"  # local shards whose BLAKE2b was checked, by size and mtime
FORMAT = "xgen-shards-v4"  # v4: content keys for the held-out split


def write_json(path: str | Path, data: dict) -> None:
    storage.write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> dict:
    return json.loads(storage.read_bytes(path))


def token_dtype(tokenizer_tokens: int) -> str:
    return "uint16" if tokenizer_tokens <= 2**16 else "uint32"


def new_manifest(
    name: str, tokenizer: Tokenizer, spec: RawInputConfig, min_doc_tokens: int, count_by: list[str], split_bytes: int
) -> dict:
    return {
        "format": FORMAT,
        "source": name,
        "tokenizer": {"identity": tokenizer.identity, "n_tokens": tokenizer.n_tokens},
        "token_dtype": token_dtype(tokenizer.n_tokens),
        "min_doc_tokens": min_doc_tokens,
        "raw": raw_identity(spec),
        "split_bytes": split_bytes,
        "meta_fields": list(spec.meta),
        "count_tokens_by": [f for f in count_by if f in spec.meta],
        "complete": False,
        "pending": [],
        "files": {},
        "stat_cache": {},
    }


def raw_identity(spec: RawInputConfig) -> dict:
    """What decides the documents a file gives: a change means preparing into a new folder."""
    return {"text_field": spec.text_field, "meta": dict(spec.meta), "format": spec.format}


def ordered_entries(manifest: dict) -> list[dict]:
    """The manifest's files in document order: by their first (sorted) path."""
    return sorted(manifest["files"].values(), key=lambda e: (sorted(e["paths"]) or [""])[0])


def ordered_shards(manifest: dict) -> list[dict]:
    return [s for e in ordered_entries(manifest) for s in e["shards"]]


def summarize(manifest: dict) -> dict:
    """Totals over the manifest's files: raw bytes, documents, tokens, shards, counts, tokens
    by metadata."""
    totals: Counter = Counter()
    by: dict[str, Counter] = {f: Counter() for f in manifest["count_tokens_by"]}
    dropped_by: dict[str, Counter] = {f: Counter() for f in manifest["count_tokens_by"]}
    for entry in manifest["files"].values():
        totals.update({k: entry[k] for k in ("documents", "tokens")})
        totals["shards"] += len(entry["shards"])
        totals["units"] += len(entry["units"])
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
    """Writes one unit's documents into numbered shards, staged under a private folder and
    committed (renamed or uploaded) only when the unit is complete; each shard's size and
    BLAKE2b are recorded for the manifest."""

    root: str  # the source's folder (local path or URL)
    stem: str  # the unit's id
    shard_tokens: int
    meta_fields: list[str]
    dtype: str
    done: list[dict] = field(default_factory=list)
    part: int = 0
    _stage: str | None = None
    _fh: io.BufferedWriter | None = None
    _hash: object = None
    _bytes: int = 0
    _lengths: list[int] = field(default_factory=list)
    _meta: dict[str, list[str]] = field(default_factory=dict)
    _keys: list[int] = field(default_factory=list)
    _tokens: int = 0

    def _name(self) -> str:
        return f"{self.stem}-{self.part:04d}"

    def write(self, tokens: np.ndarray, meta: dict[str, str]) -> None:
        if self._fh is None:
            if self._stage is None:
                self._stage = storage.staging_dir(storage.join(self.root, "shards"))
            self._fh = open(os.path.join(self._stage, f"{self._name()}.tokens"), "wb")
            self._hash, self._bytes = hashlib.blake2b(digest_size=16), 0
            self._lengths, self._keys, self._tokens = [], [], 0
            self._meta = {f: [] for f in self.meta_fields}
        data = np.ascontiguousarray(tokens, self.dtype).tobytes()
        self._fh.write(data)
        self._hash.update(data)
        self._bytes += len(data)
        self._lengths.append(len(tokens))
        self._keys.append(content_key(tokens))
        for f in self.meta_fields:
            self._meta[f].append(meta.get(f, ""))
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self.close_shard()

    def close_shard(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        arrays = {"lengths": np.asarray(self._lengths, np.int64), "keys": np.asarray(self._keys, np.uint16)}
        arrays.update({f"meta_{f}": np.asarray(v, dtype=str) for f, v in self._meta.items()})
        with open(os.path.join(self._stage, f"{self._name()}.index.npz"), "wb") as fh:
            np.savez(fh, **arrays)
        self.done.append({
            "name": self._name(), "bytes": self._bytes, "blake2b": self._hash.hexdigest(),
            "documents": len(self._lengths), "tokens": self._tokens,
        })  # fmt: skip
        self._fh = None
        self.part += 1

    def commit(self) -> list[dict]:
        """Close the open shard and give every shard of this unit its final name. On an object
        store, record the checksum the store computed (ETag, crc32c): a function of the
        bytes, so the manifest stays the same however the data was made."""
        self.close_shard()
        shard_dir = storage.join(self.root, "shards")
        for shard in self.done:
            for suffix in (".tokens", ".index.npz"):
                storage.commit_file(os.path.join(self._stage, shard["name"] + suffix), storage.join(shard_dir, shard["name"] + suffix))
        if self._stage is not None:
            os.rmdir(self._stage)
        if storage.is_url(self.root):  # the store's checksum of the object (bytes alike: alike)
            for shard in self.done:
                shard["store_identity"] = storage.stat(storage.join(shard_dir, shard["name"] + ".tokens"))[1]
        return self.done


def build_index(root: str, manifest: dict) -> dict:
    """The source's index arrays (see the module docstring) from its shards' own indexes,
    written into `root/index/`; returns what the manifest records of it."""
    shards = ordered_shards(manifest)
    n = sum(s["documents"] for s in shards)
    fields = manifest["meta_fields"]
    scratch = storage.staging_dir(root)
    starts = np.lib.format.open_memmap(os.path.join(scratch, "starts.npy"), "w+", np.int64, (n + 1,))
    lengths = np.lib.format.open_memmap(os.path.join(scratch, "lengths.npy"), "w+", np.uint32, (n,))
    keys = np.lib.format.open_memmap(os.path.join(scratch, "keys.npy"), "w+", np.uint16, (n,))
    strings: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    at, offset = 0, 0
    starts[0] = 0
    for s in shards:
        with np.load(io.BytesIO(storage.read_bytes(storage.join(root, "shards", s["name"] + ".index.npz")))) as ix:
            lens = ix["lengths"]
            keys[at : at + len(lens)] = ix["keys"]
            for f in fields:
                strings[f].append(ix[f"meta_{f}"])
        if len(lens) != s["documents"]:
            raise ConfigError(f"{root}/shards/{s['name']}.index.npz: {len(lens)} documents, the manifest says {s['documents']}")
        lengths[at : at + len(lens)] = lens
        starts[at + 1 : at + 1 + len(lens)] = offset + np.cumsum(lens)
        at += len(lens)
        offset += int(lens.sum())
    starts.flush()
    lengths.flush()
    keys.flush()
    recorded: dict = {"documents": n, "fields": {}}
    for f in fields:
        values, codes = np.unique(np.concatenate(strings[f]) if strings[f] else np.zeros(0, str), return_inverse=True)
        code_dtype = np.uint8 if len(values) <= 2**8 else np.uint16 if len(values) <= 2**16 else np.uint32
        np.save(os.path.join(scratch, f"meta_{f}.npy"), codes.astype(code_dtype))
        np.save(os.path.join(scratch, f"meta_{f}.values.npy"), values)
        recorded["fields"][f] = len(values)
    del starts, lengths, keys
    index_dir = storage.join(root, "index")
    storage.makedirs(index_dir)
    files = {}
    for name in sorted(os.listdir(scratch)):
        local = os.path.join(scratch, name)
        files[name] = {"bytes": os.path.getsize(local), "blake2b": file_digest(local)}
        storage.commit_file(local, storage.join(index_dir, name))
        if storage.is_url(root):
            files[name]["store_identity"] = storage.stat(storage.join(index_dir, name))[1]
    os.rmdir(scratch)
    recorded["files"] = files
    recorded["of"] = index_key(manifest)
    return recorded


def index_key(manifest: dict) -> str:
    """What the index is built from: the shards, in document order (a change means a rebuild)."""
    shards = ordered_shards(manifest)
    return hashlib.blake2b("\n".join(f"{s['name']} {s['blake2b']}" for s in shards).encode(), digest_size=16).hexdigest()


def file_digest(path: str | Path) -> str:
    """BLAKE2b of a file's bytes (local or URL), read in one sequential pass."""
    h = hashlib.blake2b(digest_size=16)
    with fsspec.open(str(path), "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_files(root: str, manifest: dict, record: bool = True) -> list[tuple[str, dict, str]]:
    """(folder, entry, why) of every shard and index file that is missing, of another size, or
    of other content than the manifest says. One listing per folder; a file is read (its
    BLAKE2b) only when its store identity is neither the one recorded at prepare time (an
    object store's ETag or crc32c) nor one already checked (`verified.json`, beside the
    manifest: size and modification time of local files checked before). `record` adds the
    files read here to it (training does; `prepare` leaves its output as it made it)."""
    index_files = [{"name": name, **entry} for name, entry in manifest.get("index", {}).get("files", {}).items()]
    files = [("shards", s["name"] + ".tokens", s) for s in ordered_shards(manifest)] + [("index", e["name"], e) for e in index_files]
    listed = {folder: storage.listing(storage.join(root, folder)) for folder in ("shards", "index")}
    verified_path = storage.join(root, VERIFIED)
    verified = read_json(verified_path) if VERIFIED in storage.listing(root) else {}
    bad, checked = [], {}
    for folder, file, entry in files:
        key = entry["name"] if folder == "shards" else f"index/{file}"
        found = listed[folder].get(file)
        if found is None:
            bad.append((folder, entry, "missing"))
        elif found[0] != entry["bytes"]:
            bad.append((folder, entry, f"{found[0]} bytes, not {entry['bytes']}"))
        elif found[1] == entry.get("store_identity") or verified.get(key) == [*found, entry["blake2b"]]:
            continue
        elif file_digest(storage.join(root, folder, file)) != entry["blake2b"]:
            bad.append((folder, entry, "its checksum differs"))
        else:
            checked[key] = [*found, entry["blake2b"]]
    if checked and record:
        try:  # a read-only copy of the data (or bucket) is checked again at the next start
            write_json(verified_path, {**verified, **checked})
        except Exception as ex:  # noqa: BLE001 - a cache: any store's refusal only costs a re-check
            log.info("%s: cannot record the files checked (%s); they are checked again at the next start", root, ex)
    return bad


def write_token_documents(out_dir: Path, name: str, documents: Iterable[np.ndarray], tokenizer: Tokenizer) -> dict:
    """A prepared source from documents that are token ids already (no raw file, no
    tokenizing): pre-tokenized corpora, and benchmarks that need a document of a given size."""
    root = str(out_dir)
    storage.makedirs(root)
    manifest = new_manifest(name, tokenizer, RawInputConfig(), 0, [], 0)
    writer = ShardWriter(root, "tokens", 50_000_000, [], manifest["token_dtype"])
    for doc in documents:
        writer.write(np.asarray(doc), {})
    shards = writer.commit()
    manifest["files"]["tokens"] = {
        "paths": [], "units": ["tokens"], "shards": shards, "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards), "counts": {}, "tokens_by": {},
    }  # fmt: skip
    manifest["index"] = build_index(root, manifest)
    manifest["totals"] = summarize(manifest)
    manifest["complete"] = True
    write_json(storage.join(root, MANIFEST), manifest)
    return manifest["totals"]


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, where: str | Path) -> None:
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
