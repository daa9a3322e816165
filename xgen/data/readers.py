"""Streaming readers for raw corpora: JSON Lines (plain, .gz, .zst), Parquet and plain text.

Every reader yields `(text, metadata)` one document at a time, so memory stays bounded
however large a file is, and never raises on bad input: invalid UTF-8, empty files,
truncated compressed files, malformed JSON lines and missing fields are counted in
`ReadCounts` and skipped. Paths go through fsspec, so `gs://` and other URLs work where
the matching fsspec backend is installed.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from typing import IO, Iterable, Iterator

import fsspec

from xgen.config import ConfigError, RawInputConfig

FORMATS = ("jsonl", "parquet", "text")


def detect_format(path: str, declared: str | None) -> str:
    """The declared format, or one inferred from the file name."""
    if declared:
        if declared not in FORMATS:
            raise ConfigError(f"raw input format {declared!r} is not one of {FORMATS}")
        return declared
    name = path.lower()
    for suffix in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _zstd_lines(raw: IO[bytes]) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd stream; EOFError if it ends inside a frame.

    zstandard's stream reader returns a cut-off stream as a clean end of file, so frames
    are decoded here with `decompressobj`, which says whether each frame was complete.
    """
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame, pending = decompressor.decompressobj(), False, b""
    while chunk := raw.read(1 << 20):
        while chunk:
            in_frame = True
            pending += frame.decompress(chunk)
            chunk = b""
            if frame.eof:
                chunk, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
        *lines, pending = pending.split(b"\n")
        yield from lines
    if in_frame:
        raise EOFError("zstd stream ends inside a frame")
    if pending:
        yield pending


def _open_decompressed(raw: IO[bytes], path: str) -> IO[bytes] | Iterator[bytes]:
    """A readable stream, or for zstd an iterator of lines (which `_jsonl` also accepts)."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if lower.endswith((".zst", ".zstd")):
        return _zstd_lines(raw)
    return raw


def _meta(record: dict, fields: list[str]) -> dict[str, str]:
    return {f: str(record[f]) for f in fields if record.get(f) is not None}


def _jsonl(stream: Iterable[bytes], spec: RawInputConfig, counts: Counter) -> Iterator[tuple[str, dict]]:
    for line in stream:
        if not line.strip():
            continue
        counts["records"] += 1
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            counts["invalid_utf8"] += 1
            continue
        except json.JSONDecodeError:
            counts["malformed_json"] += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get(spec.text_field), str):
            counts["missing_field"] += 1
            continue
        yield record[spec.text_field], _meta(record, spec.meta_fields)


def _text(stream: IO[bytes] | Iterator[bytes], counts: Counter) -> Iterator[tuple[str, dict]]:
    data = stream.read() if hasattr(stream, "read") else b"\n".join(stream)
    if not data.strip():
        return
    counts["records"] += 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        counts["invalid_utf8"] += 1
        return
    yield text, {}


def _parquet(raw: IO[bytes], spec: RawInputConfig, counts: Counter) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(raw)
    columns = [c for c in [spec.text_field, *spec.meta_fields] if c in parquet.schema_arrow.names]
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            counts["records"] += 1
            if not isinstance(record.get(spec.text_field), str):
                counts["missing_field"] += 1
                continue
            yield record[spec.text_field], _meta(record, spec.meta_fields)


def _corrupt_file_errors(fmt: str) -> tuple[type[BaseException], ...]:
    """Exceptions that mean a file is cut short or corrupt (counted, never raised)."""
    errors: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    if fmt == "parquet":
        import pyarrow

        errors.append(pyarrow.ArrowException)
    return tuple(errors)


def read_documents(path: str, spec: RawInputConfig, counts: Counter) -> Iterator[tuple[str, dict]]:
    """Documents of one file; problems are added to `counts` (per kind) instead of raised.

    A truncated or corrupt file keeps the documents read before the damage and counts
    once in `corrupt_files`; a file with no records at all counts in `empty_files`.
    """
    fmt = detect_format(path, spec.format)
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ConfigError(f"{path}: reading Parquet needs pyarrow: pip install 'xgen[parquet]'")
    records_before = counts["records"]
    try:
        with fsspec.open(path, "rb") as raw:
            if fmt == "parquet":
                docs = _parquet(raw, spec, counts)
            else:
                stream = _open_decompressed(raw, path)
                docs = _jsonl(stream, spec, counts) if fmt == "jsonl" else _text(stream, counts)
            for doc in docs:
                counts["documents_read"] += 1
                yield doc
    except _corrupt_file_errors(fmt):
        counts["corrupt_files"] += 1
        return
    if counts["records"] == records_before:
        counts["empty_files"] += 1
