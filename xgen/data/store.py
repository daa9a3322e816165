"""Documents addressed by id: the interface packing reads, for in-memory and prepared data.

A store knows every document's token count and metadata without reading its tokens, so
filtering, weighting and splitting are array operations; tokens are read only for the
windows a batch needs: a prepared shard is the documents' tokens end to end, so a window
of a 10-million-token document is one slice of a memory map (one ranged GET on an object
store), not the whole document.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from xgen.config import ConfigError
from xgen.data import storage
from xgen.data.heldout import content_keys
from xgen.data.shards import MANIFEST, check_files, check_tokenizer, ordered_shards, read_json
from xgen.tokenizer import Tokenizer


class DocumentStore:
    """`lengths[i]` tokens, `meta[field][i]` metadata and `keys[i]` content key
    (`xgen.data.heldout`) of document i; `tokens(i)` reads it."""

    lengths: np.ndarray
    meta: dict[str, np.ndarray]
    keys: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens `start:stop` of document `doc` (all of it by default)."""
        raise NotImplementedError

    def prepare_counts(self) -> dict[str, int]:
        """What `prepare` dropped or skipped, by reason (nothing for built-in corpora)."""
        return {}

    def prepare_totals(self) -> dict[str, int]:
        """`prepare`'s counts of what it read and kept (raw bytes, records, documents)."""
        return {}

    def dropped_short_by(self, field: str) -> dict[str, int]:
        """Documents under min_doc_tokens dropped at prepare time, per value of `field`."""
        return {}


class InMemoryStore(DocumentStore):
    """Token arrays held in memory (the built-in corpora)."""

    def __init__(self, docs: list[list[int]]):
        self._docs = [np.asarray(d, np.int32) for d in docs]
        self.lengths = np.asarray([len(d) for d in self._docs], np.int64)
        self.meta = {}
        self.keys = content_keys(self._docs)

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._docs[doc][start:stop]


class _CodedMeta(Mapping):
    """Metadata stored as small integer codes: `meta[field]` decodes on first use (a string
    per document), `codes(field)` gives (codes, values) without decoding."""

    def __init__(self, columns: dict[str, tuple[np.ndarray, np.ndarray]]):
        self._columns, self._decoded = columns, {}

    def __getitem__(self, field: str) -> np.ndarray:
        if field not in self._decoded:
            codes, values = self._columns[field]
            self._decoded[field] = values[codes] if len(values) else np.zeros(len(codes), str)
        return self._decoded[field]

    def __iter__(self):
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    def codes(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        return self._columns[field]


def index_cache_dir() -> Path:
    """Where an object store's index arrays are downloaded once to be memory-mapped."""
    return Path(os.environ.get("XGEN_CACHE_DIR", Path.home() / ".cache" / "xgen")) / "index"


class ShardStore(DocumentStore):
    """A source prepared by `task=prepare`, at a local path or an object-store URL.

    Opening it reads the manifest and memory-maps the index (an object store's index is
    downloaded once into `index_cache_dir()`); only the pages a host touches become
    resident. Shards are opened at their first read. Refused in one line at start-up: an
    unfinished prepare (naming the units not done), and a missing or damaged shard (naming
    its raw file). Every shard is checked by size from one listing of the source; its
    content by the checksum an object store keeps (ETag, crc32c, compared with the one
    recorded at prepare time: no read), or, locally, by its BLAKE2b, read once: the
    shard's size and modification time are then recorded in `verified.json` beside the
    manifest, and a later start reads only shards that changed since.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer):
        self.root = root = str(path)
        manifest_path = storage.join(root, MANIFEST)
        if not storage.exists(manifest_path):
            raise ConfigError(f"{manifest_path} does not exist: run task=prepare for this data_mix first")
        self.manifest = manifest = read_json(manifest_path)
        check_tokenizer(manifest, tokenizer, root)
        if not manifest.get("complete"):
            done = storage.listing(storage.join(root, "units"))
            missing = [u for u in manifest.get("pending", []) if f"{u}.json" not in done]
            raise ConfigError(
                f"{root}: its prepare did not finish: {len(missing)} units are not done ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); run task=prepare again (the units done are kept)"
            )
        self._shards = ordered_shards(manifest)
        if not self._shards:
            raise ConfigError(f"{root}: the manifest lists no shards")
        self._check_shards()
        self._dtype = np.dtype(manifest["token_dtype"])
        index = self._open_index()
        self.lengths = index("lengths.npy")
        self._starts = index("starts.npy")
        self.keys = index("keys.npy")
        self.meta = _CodedMeta({f: (index(f"meta_{f}.npy"), index(f"meta_{f}.values.npy")) for f in manifest["meta_fields"]})
        self._shard_starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in self._shards])]).astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}
        if len(self.lengths) != manifest["index"]["documents"] or int(self._starts[-1]) != self._shard_starts[-1]:
            raise ConfigError(f"{root}/index: {len(self.lengths)} documents of {int(self._starts[-1])} tokens, "
                              f"the manifest says {manifest['index']['documents']} of {int(self._shard_starts[-1])}")

    def _check_shards(self) -> None:
        bad = check_files(self.root, self.manifest)
        if not bad:
            return
        sources = {u: e["paths"] for e in self.manifest["files"].values() for u in e["units"]}

        def describe(folder: str, entry: dict, why: str) -> str:
            if folder == "index":
                return f"index/{entry['name']} ({why})"
            return f"{entry['name']} ({why}; from {(sources.get(entry['name'].rsplit('-', 1)[0]) or ['?'])[0]})"

        n_index = sum(folder == "index" for folder, _, _ in bad)
        what = [f"{len(bad) - n_index} of {len(self._shards)} shards"] if len(bad) > n_index else []
        what += [f"{n_index} of {len(self.manifest['index']['files'])} index files"] if n_index else []
        raise ConfigError(
            f"{self.root}: {' and '.join(what)} are missing or damaged: {', '.join(describe(*b) for b in bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}; run task=prepare again to redo them"
        )

    def _open_index(self):
        """A loader of index arrays: memory-mapped in place, or, from an object store, from a
        local copy named by the files' own checksums (never another source's index)."""
        files = self.manifest["index"]["files"]
        key = hashlib.blake2b(" ".join(f"{n}:{e['blake2b']}" for n, e in sorted(files.items())).encode(), digest_size=16).hexdigest()

        def load(name: str) -> np.ndarray:
            path = storage.local_copy(storage.join(self.root, "index", name), index_cache_dir(), key)
            if path.stat().st_size != files[name]["bytes"]:
                raise ConfigError(f"{path}: {path.stat().st_size} bytes, the manifest says {files[name]['bytes']}; delete it")
            return np.load(path, mmap_mode="r") if not name.endswith(".values.npy") else np.load(path)

        return load

    def _read(self, shard: int, start: int, stop: int) -> np.ndarray:
        """Tokens `start:stop` of one shard: a slice of its memory map, or one ranged read."""
        url = storage.join(self.root, "shards", self._shards[shard]["name"] + ".tokens")
        if storage.is_url(url):
            size = self._dtype.itemsize
            return np.frombuffer(storage.read_range(url, start * size, stop * size), self._dtype)
        mapped = self._maps.get(shard)
        if mapped is None:
            mapped = self._maps[shard] = np.memmap(url, self._dtype, "r")
        return mapped[start:stop]

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        length = int(self.lengths[doc])
        stop = length if stop is None else min(stop, length)
        if start >= stop:
            return np.zeros(0, np.int32)
        first = int(self._starts[doc]) + start
        shard = int(np.searchsorted(self._shard_starts, first, side="right")) - 1
        offset = first - int(self._shard_starts[shard])
        return self._read(shard, offset, offset + stop - start).astype(np.int32)

    def tokens_by(self, field: str) -> dict[str, int] | None:
        """Tokens per value of a metadata field, as counted by `prepare` (before any filter)."""
        return self.manifest["totals"]["tokens_by"].get(field)

    def prepare_counts(self) -> dict[str, int]:
        totals = self.manifest["totals"]
        return {k: v for k, v in totals.items() if isinstance(v, int) and k not in _NOT_DROPS}

    def prepare_totals(self) -> dict[str, int]:
        totals = self.manifest["totals"]
        return {k: totals.get(k, 0) for k in ("raw_bytes", "records", "documents_read", "documents", "tokens")}

    def dropped_short_by(self, field: str) -> dict[str, int]:
        return self.manifest["totals"].get("dropped_short_by", {}).get(field, {})


# Totals that are not losses.
_NOT_DROPS = {"documents", "tokens", "shards", "files", "records", "documents_read", "units", "raw_bytes"}
