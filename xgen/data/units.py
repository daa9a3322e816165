"""Units of `prepare`'s work: a file, or a line-aligned byte range of a large one.

A unit is the unit of parallelism, of retry and of restart. It is a pure function of the
input bytes and the settings: it reads its range, tokenizes in the worker that runs it,
writes its own shards (named after the unit, so a retry or a second run writes the same
names and the same bytes) and, last, its completion record. Which worker ran it, how often
it was retried and in what order units finished change nothing in the output.

A unit's id names the file by its path, size and store identity (modification time, ETag
or crc32c: `xgen.data.storage.stat`), so a changed file gets new units and its old shards
can never be mistaken for the new ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from xgen.config import RawInputConfig
from xgen.data import storage
from xgen.data.readers import read_documents, splittable
from xgen.data.shards import ShardWriter
from xgen.tokenizer.xgen import encode_to_arrays


@dataclass(frozen=True)
class Unit:
    path: str  # local real path or URL
    parts: tuple[str, ...]  # the path below its pattern's fixed prefix (`path:N` metadata)
    stat: tuple[int, str]  # (size, identity) when planned
    index: int  # this unit's range number within the file
    count: int  # ranges of the file (1: the whole file)
    split_bytes: int

    @property
    def file_key(self) -> str:
        text = json.dumps([self.path, list(self.stat)])
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    @property
    def id(self) -> str:
        return f"{self.file_key}-{self.index:05d}"

    @property
    def byte_range(self) -> tuple[int, int] | None:
        if self.count == 1:
            return None
        return self.index * self.split_bytes, min((self.index + 1) * self.split_bytes, self.stat[0])


def plan_units(path: str, parts: tuple[str, ...], stat: tuple[int, str], spec: RawInputConfig, split_bytes: int) -> list[Unit]:
    """The units of one file: one, or `ceil(size / split_bytes)` line-aligned ranges of an
    uncompressed JSON Lines file larger than `split_bytes`."""
    size = stat[0]
    count = math.ceil(size / split_bytes) if size > split_bytes and splittable(path, spec.format) else 1
    return [Unit(path, parts, stat, k, count, split_bytes) for k in range(count)]


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs to run a unit (pickled to worker processes and Ray tasks)."""

    unit: Unit
    root: str  # the source's prepared folder
    spec: RawInputConfig
    min_doc_tokens: int
    meta_fields: tuple[str, ...]
    count_by: tuple[str, ...]
    shard_tokens: int
    batch_documents: int
    dtype: str
    tokenizer: str  # its name (`Tokenizer.from_name`): the one whose identity the manifest records


def record_path(root: str, unit_id: str) -> str:
    return storage.join(root, "units", f"{unit_id}.json")


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_unit(job: UnitJob) -> dict:
    """Read, tokenize and write one unit; write and return its completion record."""
    unit = job.unit
    counts: Counter = Counter()
    digest = hashlib.blake2b(digest_size=16)
    writer = ShardWriter(job.root, unit.id, job.shard_tokens, list(job.meta_fields), job.dtype)
    tokens_by: dict[str, Counter] = {f: Counter() for f in job.count_by}
    dropped_by: dict[str, Counter] = {f: Counter() for f in job.count_by}
    documents = tokens = 0
    docs = read_documents(unit.path, job.spec, counts, unit.parts, byte_range=unit.byte_range, digest=digest)
    for batch in _batched(docs, job.batch_documents):
        encoded = encode_to_arrays([text for text, _ in batch], job.tokenizer)  # one core: the worker's
        for ids, (_, meta) in zip(encoded, batch):
            if len(ids) < job.min_doc_tokens:
                counts["dropped_short"] += 1
                for f in job.count_by:
                    dropped_by[f][meta.get(f, "")] += 1
                continue
            writer.write(ids, meta)
            documents += 1
            tokens += len(ids)
            for f in job.count_by:
                tokens_by[f][meta.get(f, "")] += len(ids)
    record = {
        "id": unit.id,
        "path": unit.path,
        "stat": list(unit.stat),
        "index": unit.index,
        "count": unit.count,
        "digest": digest.hexdigest(),
        "shards": writer.commit(),
        "documents": documents,
        "tokens": tokens,
        "counts": dict(sorted(counts.items())),
        "tokens_by": {f: dict(sorted(c.items())) for f, c in tokens_by.items()},
        "dropped_short_by": {f: dict(sorted(c.items())) for f, c in dropped_by.items() if c},
    }
    storage.write_bytes(record_path(job.root, unit.id), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return record
