"""Streaming readers for raw corpora as released: JSON Lines, JSON arrays, Parquet, Arrow
(a Hugging Face dataset saved with `save_to_disk`), plain text.

Every reader yields `(text, metadata)` one document at a time, and never raises on bad
input: invalid UTF-8, empty files, truncated compressed files, lines that break the JSON
parser and missing fields are counted in a `Counter` and skipped. Compression is read from
the name (.gz, .zst, .bz2, .xz); an archive or codec that cannot be read (.zip, .lz4, ...) is
refused by name rather than read as text. Paths go through fsspec, so `gs://` and other URLs
work where the matching fsspec backend is installed.

Text and metadata are found by address (`xgen.data.addresses`), so nested release formats
(RedPajama's `meta`, StarCoderData's language folders) are read as they are published.
`text_fields` lists what a file's records could hold their text in, for `prepare` to find
the text field when a config does not name it.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import zlib
from collections import Counter
from typing import IO, Any, Iterable, Iterator

import fsspec

from xgen.config import ConfigError, RawInputConfig
from xgen.data.addresses import Address, compile_addresses, stored_value

FORMATS = ("jsonl", "json", "parquet", "arrow", "text")
COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
# Containers and codecs that are not one document stream: read as text they would be garbage.
REFUSED = (".zip", ".tar", ".tgz", ".7z", ".rar", ".lz4", ".lz", ".lzo", ".br", ".snappy", ".z")
# What a JSON parser raises on hostile input: bad syntax (JSONDecodeError is a ValueError),
# a number past Python's digit limit (ValueError), deep nesting (RecursionError).
JSON_ERRORS = (ValueError, RecursionError)


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def detect_format(path: str, declared: str | None) -> str:
    """The declared format, or one inferred from the file name; unreadable kinds are refused."""
    name = path.lower()
    if name.endswith(REFUSED) or _strip_compression(name).endswith(REFUSED):
        raise ConfigError(
            f"{path}: {name.rsplit('.', 1)[-1]} files are not read (compression: gz, zst, bz2, xz); "
            "unpack it or leave it out of raw.paths"
        )
    if declared:
        if declared not in FORMATS:
            raise ConfigError(f"raw input format {declared!r} is not one of {FORMATS}")
        return declared
    name = _strip_compression(name)
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".arrow", ".feather")):
        if name != path.lower():  # pyarrow reads an Arrow file by seeking; a compressed one cannot be
            raise ConfigError(f"{path}: a compressed Arrow file is not read; decompress it")
        return "arrow"
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
    """A readable stream, or for zstd an iterator of lines (which the line readers accept)."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if lower.endswith((".zst", ".zstd")):
        return _zstd_lines(raw)
    if lower.endswith(".bz2"):
        return bz2.BZ2File(raw)
    if lower.endswith(".xz"):
        return lzma.LZMAFile(raw)
    return raw


def _read_all(stream: IO[bytes] | Iterator[bytes]) -> bytes:
    return stream.read() if hasattr(stream, "read") else b"\n".join(stream)


class _Extract:
    """Text and metadata of a record, by address; what is missing is counted."""

    def __init__(self, spec: RawInputConfig, parts: tuple[str, ...], counts: Counter):
        self.text = Address.parse(spec.text_field) if spec.text_field is not None else None  # None: text files only
        self.meta = compile_addresses(spec.meta)
        self.parts, self.counts = parts, counts

    def __call__(self, record: Any) -> tuple[str, dict] | None:
        text = self.text.get(record, self.parts) if isinstance(record, dict) else None
        if not isinstance(text, str):
            self.counts["missing_field"] += 1
            return None
        meta = {}
        for name, address in self.meta.items():
            value = stored_value(address.get(record, self.parts))
            if value is None:
                self.counts[f"missing_meta:{name}"] += 1
            else:
                meta[name] = value
        return text, meta


def _records_of_lines(lines: Iterable[bytes], counts: Counter) -> Iterator[Any]:
    for line in lines:
        if not line.strip():
            continue
        counts["records"] += 1
        try:
            yield json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            counts["invalid_utf8"] += 1
        except JSON_ERRORS:
            counts["malformed_json"] += 1


def _records_of_json(stream: IO[bytes] | Iterator[bytes], counts: Counter) -> Iterator[Any]:
    """A `.json` file: a JSON array (one record per element) or, when it does not start
    with `[`, JSON Lines. An array that does not parse is one malformed record."""
    data = _read_all(stream)
    if not data.lstrip().startswith(b"["):
        yield from _records_of_lines(data.split(b"\n"), counts)
        return
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        counts["records"] += 1
        counts["invalid_utf8"] += 1
        return
    except JSON_ERRORS:
        counts["records"] += 1
        counts["malformed_json"] += 1
        return
    for record in records:
        counts["records"] += 1
        yield record


def _records_of_parquet(raw: IO[bytes], columns: set[str], counts: Counter) -> Iterator[Any]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(raw)
    wanted = [c for c in parquet.schema_arrow.names if c in columns]
    for batch in parquet.iter_batches(batch_size=1024, columns=wanted):
        for record in batch.to_pylist():
            counts["records"] += 1
            yield record


def _arrow_batches(raw: IO[bytes]) -> tuple[Any, Iterator[Any]]:
    """(schema, record batches) of an Arrow IPC file: the stream format, which `datasets`'
    `save_to_disk` writes (`data-00000-of-0000N.arrow`), or the file format (Feather v2,
    `pyarrow.ipc.new_file`), told apart by the file format's magic bytes."""
    import pyarrow as pa

    head = raw.read(6)
    raw.seek(0)
    if head == b"ARROW1":
        reader = pa.ipc.open_file(raw)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    stream = pa.ipc.open_stream(raw)
    return stream.schema, iter(stream)


def _records_of_arrow(raw: IO[bytes], columns: set[str], counts: Counter) -> Iterator[Any]:
    schema, batches = _arrow_batches(raw)
    wanted = [c for c in schema.names if c in columns]
    for batch in batches:
        for record in batch.select(wanted).to_pylist():
            counts["records"] += 1
            yield record


def _text(stream: IO[bytes] | Iterator[bytes], counts: Counter) -> Iterator[tuple[str, dict]]:
    """A text file is one document; a bad byte loses this file's document and nothing else."""
    data = _read_all(stream)
    if not data.strip():
        return
    counts["records"] += 1
    try:
        yield data.decode("utf-8"), {}
    except UnicodeDecodeError:
        counts["invalid_utf8"] += 1


def corrupt_file_errors(fmt: str) -> tuple[type[BaseException], ...]:
    """Exceptions that mean a file is cut short or corrupt (counted, never raised)."""
    errors: list[type[BaseException]] = [EOFError, OSError, zlib.error, lzma.LZMAError]  # BadGzipFile is an OSError
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    if fmt in ("parquet", "arrow"):
        import pyarrow

        errors.append(pyarrow.ArrowException)
    return tuple(errors)


class _Hashing:
    """A read-only stream that hashes the bytes read through it and counts them, so a file
    is identified by content while it is read, never by a second pass."""

    def __init__(self, raw: IO[bytes], digest: Any, counts: Counter):
        self.raw, self.digest, self.counts = raw, digest, counts

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.counts["raw_bytes"] += len(data)
        return data

    def readline(self) -> bytes:
        line = self.raw.readline()
        self.digest.update(line)
        self.counts["raw_bytes"] += len(line)
        return line

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def drain(self) -> None:
        """Hash what the reader left unread (the rest of a corrupt file)."""
        while self.read(1 << 22):
            pass


def splittable(path: str, declared: str | None) -> bool:
    """Can the file be read in line-aligned byte ranges (uncompressed JSON Lines)?"""
    return detect_format(path, declared) == "jsonl" and _strip_compression(path.lower()) == path.lower()


def _range_lines(raw: IO[bytes], start: int, end: int, digest: Any, counts: Counter) -> Iterator[bytes]:
    """The lines whose first byte lies in [start, end): a line crossing `end` belongs to this
    range and is read to its end; one crossing `start` belongs to the range before."""
    pos = 0
    if start > 0:
        raw.seek(start - 1)
        pos = start - 1 + len(raw.readline())  # the end of the line holding byte start - 1
    while pos < end:
        line = raw.readline()
        if not line:
            break
        pos += len(line)
        digest.update(line)
        counts["raw_bytes"] += len(line)
        yield line


def _need_pyarrow(path: str, fmt: str) -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(f"{path}: reading {fmt.capitalize()} needs pyarrow: pip install 'xgen[parquet]'")


def _is_text_type(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"


def text_fields(path: str, declared: str | None, records: int = 100) -> tuple[list[str], list[str]] | None:
    """(fields that hold text, every top-level field) of one file, in the file's order; None
    for a plain text file, which has no fields. Parquet and Arrow files answer from their
    schema (string columns); JSON from its first `records` records, where a field holds text
    if it is a string in at least half of them (a few bad records, `{"text": 42}`, do not hide
    the text field; a field most records lack, or hold something else in, is not it). A file
    that has no readable record answers ([], []): the prepare counts what is wrong with it;
    a truncated one answers from the records before the damage."""
    fmt = detect_format(path, declared)
    if fmt == "text":
        return None
    if fmt in ("parquet", "arrow"):
        _need_pyarrow(path, fmt)
    seen: dict[str, int] = {}  # field -> records in which it is a string
    n = 0  # records (JSON objects) read
    try:
        with fsspec.open(path, "rb") as raw:
            if fmt in ("parquet", "arrow"):
                import pyarrow.parquet as pq

                schema = pq.ParquetFile(raw).schema_arrow if fmt == "parquet" else _arrow_batches(raw)[0]
                return [f.name for f in schema if _is_text_type(f.type)], list(schema.names)
            counts: Counter = Counter()
            stream = _open_decompressed(raw, path)
            found = _records_of_json(stream, counts) if fmt == "json" else _records_of_lines(stream, counts)
            for record in found:
                if not isinstance(record, dict):
                    continue
                n += 1
                for key, value in record.items():
                    seen[key] = seen.get(key, 0) + isinstance(value, str)
                if n >= records:
                    break
    except corrupt_file_errors(fmt):  # a truncated file: the records before the damage answer
        pass
    return [k for k, strings in seen.items() if strings and 2 * strings >= n], list(seen)


def read_documents(
    path: str,
    spec: RawInputConfig,
    counts: Counter,
    parts: tuple[str, ...] = (),
    *,
    byte_range: tuple[int, int] | None = None,
    digest: Any = None,
) -> Iterator[tuple[str, dict]]:
    """Documents of one file; problems are added to `counts` (per kind) instead of raised.

    `parts` is the file's path below its pattern's fixed prefix (for `path:N` addresses).
    A truncated or corrupt file keeps the documents read before the damage and counts
    once in `corrupt_files`; a file with no records at all counts in `empty_files`.
    `byte_range` reads only the lines starting in it (a `splittable` file). `digest` (a
    hashlib object) is fed every byte of the file (of the range's lines), read once, and
    `counts["raw_bytes"]` counts them.
    """
    fmt = detect_format(path, spec.format)
    if fmt in ("parquet", "arrow"):
        _need_pyarrow(path, fmt)
    if spec.text_field is None and fmt != "text":
        raise ConfigError(f"{path}: raw.text_field is not set (prepare finds it before reading: xgen.data.prepare)")
    if digest is None:
        digest = hashlib.blake2b(digest_size=16)
    extract = _Extract(spec, parts, counts)
    records_before = counts["records"]
    raw: Any = None
    try:
        with fsspec.open(path, "rb") as opened:
            if byte_range is not None:
                docs: Iterator[tuple[str, dict] | None] = map(
                    extract, _records_of_lines(_range_lines(opened, *byte_range, digest, counts), counts)
                )
            elif fmt in ("parquet", "arrow"):
                columns = {a.column for a in (extract.text, *extract.meta.values())}
                records = (_records_of_parquet if fmt == "parquet" else _records_of_arrow)(opened, columns, counts)
                docs = map(extract, records)
            else:
                raw = _Hashing(opened, digest, counts)
                if fmt == "text":
                    docs = _text(_open_decompressed(raw, path), counts)
                elif fmt == "json":
                    docs = map(extract, _records_of_json(_open_decompressed(raw, path), counts))
                else:
                    docs = map(extract, _records_of_lines(_open_decompressed(raw, path), counts))
            try:
                for doc in docs:
                    if doc is not None:
                        counts["documents_read"] += 1
                        yield doc
            except corrupt_file_errors(fmt):
                counts["corrupt_files"] += 1
            if raw is not None:
                raw.drain()  # the rest of a corrupt file, or what a decompressor left unread
    except corrupt_file_errors(fmt):  # the file could not be opened or read at all
        counts["corrupt_files"] += 1
        return
    if fmt in ("parquet", "arrow"):  # read by seeking: hashed in one sequential pass
        with fsspec.open(path, "rb") as fh:
            _Hashing(fh, digest, counts).drain()
    if counts["records"] == records_before and (byte_range is None or byte_range[0] == 0):
        counts["empty_files"] += 1
