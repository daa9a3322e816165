"""Documents addressed by id: the interface packing reads, for in-memory and prepared data.

A store knows every document's token count and metadata without reading its tokens, so
filtering, weighting and splitting are array operations; tokens are read only for the
windows a batch needs: ArrayRecord gives random access, and a prepared document is stored
as records of at most `chunk_tokens` tokens, so a window of a 10-million-token document
reads one or two records, not the whole document.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from xgen.config import ConfigError
from xgen.data.shards import MANIFEST, check_tokenizer
from xgen.tokenizer import Tokenizer


class DocumentStore:
    """`lengths[i]` tokens and `meta[field][i]` metadata of document i; `tokens(i)` reads it."""

    lengths: np.ndarray
    meta: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens `start:stop` of document `doc` (all of it by default)."""
        raise NotImplementedError

    def prepare_counts(self) -> dict[str, int]:
        """What `prepare` dropped or skipped, by reason (nothing for built-in corpora)."""
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

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._docs[doc][start:stop]


class ShardStore(DocumentStore):
    """A source prepared by `task=prepare`: its manifest, shard indexes and ArrayRecord files."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer):
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise ConfigError(f"{manifest_path} does not exist: run task=prepare for this data_mix first")
        self.manifest = json.loads(manifest_path.read_text())
        check_tokenizer(self.manifest, tokenizer, root)
        names = [s for _, entry in sorted(self.manifest["files"].items()) for s in entry["shards"]]
        if not names:
            raise ConfigError(f"{root}: the manifest lists no shards")
        indexes = [np.load(root / "shards" / f"{n}.index.npz") for n in names]
        self.lengths = np.concatenate([ix["lengths"] for ix in indexes])
        self.meta = {
            f: np.concatenate([ix[f"meta_{f}"] for ix in indexes]) for f in self.manifest["meta_fields"]
        }
        records = np.concatenate([ix["records"] for ix in indexes])
        self._first_record = np.concatenate([[0], np.cumsum(records)])
        self._chunk = int(self.manifest["chunk_tokens"])
        self._dtype = np.dtype(self.manifest["token_dtype"])
        self._source = ArrayRecordDataSource([str(root / "shards" / f"{n}.array_record") for n in names])
        if len(self._source) != self._first_record[-1]:
            raise ConfigError(f"{root}: shards hold {len(self._source)} records, indexes {self._first_record[-1]}")

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        length = int(self.lengths[doc])
        stop = length if stop is None else min(stop, length)
        if start >= stop:
            return np.zeros(0, np.int32)
        first, last = start // self._chunk, (stop - 1) // self._chunk
        base = int(self._first_record[doc])
        chunks = [np.frombuffer(self._source[base + k], self._dtype) for k in range(first, last + 1)]
        offset = first * self._chunk
        return np.concatenate(chunks)[start - offset : stop - offset].astype(np.int32)

    def tokens_by(self, field: str) -> dict[str, int] | None:
        """Tokens per value of a metadata field, as counted by `prepare` (before any filter)."""
        return self.manifest["totals"]["tokens_by"].get(field)

    def prepare_counts(self) -> dict[str, int]:
        totals = self.manifest["totals"]
        return {k: v for k, v in totals.items() if isinstance(v, int) and k not in _NOT_DROPS}

    def dropped_short_by(self, field: str) -> dict[str, int]:
        return self.manifest["totals"].get("dropped_short_by", {}).get(field, {})


# Totals that are not losses.
_NOT_DROPS = {"documents", "tokens", "shards", "files", "records", "documents_read"}
