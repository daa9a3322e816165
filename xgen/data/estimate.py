"""`task=prepare prepare.dry_run=true`: what a prepare would read, its tokens and its hours.

Before paying for a cluster, one wants the corpus's size, its token count and the hours it
takes, without preparing anything. Sizes come from the storage's own metadata (`os.stat`,
`fs.ls`/`fs.info`), so listing a petabyte reads no file. Tokens come from a sample: up to
`prepare.sample_bytes` of decompressed text from each of a few files spread over the sorted
list (the same files every time, so two dry runs agree), read, parsed and tokenized as the
prepare would. The ratio measured is tokens per *stored* byte (the compressed size of a
compressed file), because stored bytes are what the listing knows: a compressed file's prefix
is decompressed here, in small steps, so the compressed bytes consumed are known. Each
sampled file's ratio is weighted by the file's size: a large file read in part counts for
what it holds, a small (or empty, or corrupt) one read whole for no more than it holds.

Hours are a linear extrapolation from ONE core of this machine: the sample's stored bytes over
the seconds it took to read, parse and tokenize them on one core, scaled to N cores.
Preparing is embarrassingly parallel (files and byte ranges are independent units), so this
is close while the units outnumber the cores and storage keeps up; it is not a promise.
"""

from __future__ import annotations

import bz2
import lzma
import os
import platform
import time
import uuid
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import fsspec

from xgen.config import DataMixConfig, PrepareConfig, RawInputConfig
from xgen.data import storage
from xgen.data.inputs import RawFile, source_files, spread
from xgen.data.prepare import sources_to_prepare
from xgen.data.readers import COMPRESSIONS, corrupt_file_errors, detect_format, read_documents
from xgen.data.units import plan_units
from xgen.tokenizer import Tokenizer

SAMPLE_FILES = 8  # files sampled per source
_STEP = 1 << 14  # compressed bytes fed at a time: the precision of "compressed bytes consumed"


@dataclass
class Sample:
    """What was read from the sampled files of one source."""

    files: int = 0
    stored_bytes: float = 0.0  # bytes on storage the documents below came from
    text_bytes: int = 0  # decompressed bytes read (JSON Lines, text); text of the documents (JSON, Parquet)
    documents: int = 0
    tokens: int = 0
    tokens_kept: int = 0  # in documents of at least min_doc_tokens (what the manifest counts)
    read_s: float = 0.0  # read + decompress + parse, on one core
    tokenize_s: float = 0.0  # encode_ordinary_batch(num_threads=1)

    @property
    def seconds(self) -> float:
        return self.read_s + self.tokenize_s


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def stored_sizes(paths: list[str]) -> list[int]:
    """Bytes on storage of each path, from metadata only: one listing per folder (one request
    on an object store, not one per file); a file the listing misses is asked for."""
    folders: dict[str, dict] = {}
    sizes = []
    for p in paths:
        folder, name = p.rstrip("/").rsplit("/", 1)
        listed = folders.setdefault(folder, storage.listing(folder))
        sizes.append(listed[name][0] if name in listed else storage.stat(p)[0])
    return sizes


def _compression(path: str) -> str | None:
    return next((c for c in COMPRESSIONS if path.lower().endswith(c)), None)


def units_of(path: str, size: int, spec: RawInputConfig, split_bytes: int) -> int:
    """Work units of one file, by prepare's own rule (`xgen.data.units.plan_units`)."""
    return len(plan_units(path, (), (size, ""), spec, split_bytes))


def _decompressor(compression: str) -> Callable[[], object]:
    if compression == ".gz":
        return lambda: zlib.decompressobj(32 + zlib.MAX_WBITS)
    if compression == ".bz2":
        return bz2.BZ2Decompressor
    if compression == ".xz":
        return lzma.LZMADecompressor
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj


def read_prefix(path: str, budget: int, whole_line: bool = False) -> tuple[bytes, int, bool]:
    """(decompressed bytes, at least `budget` of them unless the file is shorter, and with
    `whole_line` at least one line end; stored bytes consumed; whether that was the whole
    file). Multi-member gzip and multi-frame zstd are followed; a corrupt or truncated stream
    ends the file where it breaks, as in the reader."""
    compression = _compression(path)
    make = _decompressor(compression) if compression else None
    out: list[bytes] = []
    have, consumed, line_end = 0, 0, not whole_line
    with fsspec.open(path, "rb") as fh:
        d = make() if make else None
        while have < budget or not line_end:
            chunk = fh.read(_STEP if d or have >= budget else min(1 << 20, budget - have))
            if not chunk:
                return b"".join(out), consumed, True
            consumed += len(chunk)
            new: list[bytes] = []
            try:
                while chunk and d is not None:
                    new.append(d.decompress(chunk))
                    chunk, d = (d.unused_data, make()) if d.eof else (b"", d)
            except corrupt_file_errors("jsonl"):
                return b"".join(out + new), consumed, True
            new = new if d is not None else [chunk]
            out += new
            have += sum(map(len, new))
            line_end = line_end or any(b"\n" in b for b in new)
        return b"".join(out), consumed, not fh.read(1)


def _stage(name: str, data: bytes) -> tuple[str, Callable[[], None]]:
    """`data` as an in-memory file named `name` (compression suffix removed: it is already
    decompressed), for `read_documents`; and how to remove it."""
    mem = fsspec.filesystem("memory")
    compression = _compression(name)
    folder = f"/xgen-dry-run/{uuid.uuid4().hex}"
    path = f"{folder}/{name[: -len(compression)] if compression else name}"
    mem.pipe_file(path, data)
    return "memory://" + path, lambda: mem.rm(folder, recursive=True)


def sample_file(raw: RawFile, size: int, spec: RawInputConfig, budget: int, tok: Tokenizer, min_doc_tokens: int) -> Sample:
    """Read, parse and tokenize up to `budget` decompressed bytes of one file, on this core.

    JSON Lines and text are read from a decompressed prefix (cut at its last line end): the
    stored bytes it stands for are the compressed bytes consumed, pro rata for the part kept.
    JSON arrays and Parquet cannot be read from a prefix: they are read until `budget` bytes
    of text, and stand for the file's size times the fraction of its records read."""
    fmt = detect_format(raw.path, spec.format)
    counts: Counter = Counter()
    texts: list[str] = []
    t0 = time.perf_counter()
    if fmt in ("jsonl", "text"):
        data, consumed, whole = read_prefix(raw.path, budget, whole_line=fmt == "jsonl")
        kept = data if whole or b"\n" not in data else data[: data.rindex(b"\n") + 1]
        stored = float(size) if whole else consumed * len(kept) / max(len(data), 1)
        url, remove = _stage(os.path.basename(raw.path), kept)
        try:
            texts = [text for text, _ in read_documents(url, spec, counts, raw.parts)]
        finally:
            remove()
        text_bytes = len(kept)
        read_s = time.perf_counter() - t0
    else:
        text_bytes = 0
        docs = read_documents(raw.path, spec, counts, raw.parts)
        for text, _ in docs:
            texts.append(text)
            text_bytes += len(text.encode("utf-8", "surrogatepass"))
            if text_bytes >= budget:
                break
        read_records = counts["records"]
        read_s = time.perf_counter() - t0
        total = _records_in(raw.path, fmt, docs, counts)  # not timed: the prepare does not count twice
        stored = size * read_records / total if total else float(size)
    t1 = time.perf_counter()
    lengths = [len(ids) for ids in tok.encoding.encode_ordinary_batch(texts, num_threads=1)]
    tokenize_s = time.perf_counter() - t1
    kept_tokens = sum(n for n in lengths if n >= min_doc_tokens)
    return Sample(1, stored, text_bytes, len(texts), sum(lengths), kept_tokens, read_s, tokenize_s)


def _records_in(path: str, fmt: str, rest, counts: Counter) -> int:
    """Records in the whole file: Parquet's footer says; a JSON array is already in memory."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rest.close()
        with fsspec.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    for _ in rest:
        pass
    return counts["records"]


def _weighted(samples: list[tuple[Sample, int]], field: str) -> float:
    """Per stored byte of the source: each sampled file's own ratio, weighted by the file's
    size, so a large file sampled in part counts for what it holds, not for what was read."""
    used = [(getattr(x, field) / x.stored_bytes, size) for x, size in samples if x.stored_bytes > 0]
    weight = sum(size for _, size in used)
    return sum(r * size for r, size in used) / weight if weight else 0.0


def plan_source(name: str, spec: RawInputConfig, opts: PrepareConfig, tok: Tokenizer, min_doc_tokens: int) -> dict:
    """Listing and estimates of one source (the same files the prepare would read)."""
    expanded = source_files(name, spec)
    for f in expanded.files:
        detect_format(f.path, spec.format)  # refuses what the prepare would refuse, now
    sizes = dict(zip([f.path for f in expanded.files], stored_sizes([f.path for f in expanded.files])))
    total_bytes = sum(sizes.values())
    chosen = spread(expanded.files, SAMPLE_FILES)
    samples = [(sample_file(f, sizes[f.path], spec, opts.sample_bytes, tok, min_doc_tokens), sizes[f.path]) for f in chosen]
    per_byte = {k: _weighted(samples, k) for k in ("tokens", "tokens_kept", "documents", "seconds")}
    rate = 1 / per_byte["seconds"] if per_byte["seconds"] > 0 else None
    pooled = {k: sum(getattr(x, k) for x, _ in samples) for k in asdict(Sample())}
    return {
        "files": len(expanded.files),
        "units": sum(units_of(p, s, spec, opts.split_bytes) for p, s in sizes.items()),
        "bytes": total_bytes,
        "dangling_symlinks": len(expanded.dangling_symlinks),
        "tokens_per_stored_byte": per_byte["tokens"],
        "estimated_tokens": round(per_byte["tokens"] * total_bytes),
        "estimated_tokens_kept": round(per_byte["tokens_kept"] * total_bytes),
        "estimated_documents": round(per_byte["documents"] * total_bytes),
        "sample": {k: v for k, v in pooled.items() if not k.endswith("_s")} | {"stored_bytes": round(pooled["stored_bytes"])},
        "sample_files": [
            {
                "path": f.path,
                "bytes": size,
                "sampled_stored_bytes": round(x.stored_bytes),
                "text_bytes": x.text_bytes,
                "documents": x.documents,
                "tokens": x.tokens,
            }
            for f, (x, size) in zip(chosen, samples)
        ],
        "timing": {
            "read_s": pooled["read_s"],
            "tokenize_s": pooled["tokenize_s"],
            "stored_bytes_per_s_per_core": rate,
            "core_hours": total_bytes / rate / 3600 if rate else None,
        },
    }


def plan_mix(mix: DataMixConfig, opts: PrepareConfig, tok: Tokenizer) -> dict:
    """The dry run's figures for every source `prepare_mix` would prepare: kind=prepared with
    raw inputs, a `path` shared by several sources counted once. Nothing is written."""
    todo = sources_to_prepare(mix)
    tok.encoding.encode_ordinary_batch(["warm up the tokenizer before timing it"], num_threads=1)
    sources = {name: plan_source(name, src.raw, opts, tok, mix.min_doc_tokens) for name, src in todo.items()}
    keys = ("files", "units", "bytes", "estimated_tokens", "estimated_tokens_kept", "estimated_documents")
    total = {k: sum(s[k] for s in sources.values()) for k in keys}
    core_hours = [s["timing"]["core_hours"] for s in sources.values()]
    known = None if None in core_hours else sum(core_hours)
    workers = opts.workers if opts.workers > 0 else 1
    cores = list(dict.fromkeys([workers, *opts.plan_cores]))
    cpu = cpu_name()
    return {
        "data_mix": mix.name,
        "min_doc_tokens": mix.min_doc_tokens,
        "sample_bytes": opts.sample_bytes,
        "sample_files_per_source": SAMPLE_FILES,
        "split_bytes": opts.split_bytes,
        "workers": opts.workers,
        "tokens_per": "stored byte (a compressed file's compressed size)",
        "sources": sources,
        "total": total | {"tokens_per_stored_byte": total["estimated_tokens"] / total["bytes"] if total["bytes"] else 0.0},
        "timing": {
            "cpu": cpu,
            "basis": f"linear extrapolation from one core of this machine ({cpu})",
            "formula": "hours on N cores = sum over sources of stored bytes / (stored bytes per second on one core, "
            "measured reading, parsing and tokenizing that source's sample) / 3600 / N",
            "core_hours": known,
            "hours": [
                {"cores": n, "hours": known / n if known is not None else None, "this_run": i == 0} for i, n in enumerate(cores)
            ],
        },
    }


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _gb(n: int) -> str:
    gb = n / 1e9
    return f"{gb:,.2f}" if gb >= 10 else f"{gb:.3g}"


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.1f} h"
    if hours * 60 >= 1:
        return f"{hours * 60:.1f} min"
    return f"{hours * 3600:.1f} s" if hours * 3600 >= 0.1 else "< 0.1 s"


def format_plan(plan: dict) -> str:
    """The plan as a table and the hours lines."""
    header = ("source", "files", "units", "GB", "est. tokens", f"kept (>={plan['min_doc_tokens']})", "tokens/stored byte")
    rows = [
        (name, f"{s['files']:,}", f"{s['units']:,}", _gb(s["bytes"]), _count(s["estimated_tokens"]),
         _count(s["estimated_tokens_kept"]), f"{s['tokens_per_stored_byte']:.3f}")
        for name, s in plan["sources"].items()
    ]  # fmt: skip
    t = plan["total"]
    rows.append(("total", f"{t['files']:,}", f"{t['units']:,}", _gb(t["bytes"]), _count(t["estimated_tokens"]),
                 _count(t["estimated_tokens_kept"]), f"{t['tokens_per_stored_byte']:.3f}"))  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [line(header), *map(line, rows[:-1]), "-" * len(line(header)), line(rows[-1])]
    sample_stored = sum(s["sample"]["stored_bytes"] for s in plan["sources"].values())
    sample_text = sum(s["sample"]["text_bytes"] for s in plan["sources"].values())
    sample_tokens = sum(s["sample"]["tokens"] for s in plan["sources"].values())
    out.append(
        f"sample: up to {plan['sample_files_per_source']} files per source, up to {plan['sample_bytes']:,} decompressed bytes "
        f"each: {sample_stored:,} stored bytes ({sample_text:,} decompressed) gave {sample_tokens:,} tokens; "
        "tokens/stored byte is per byte on storage (compressed size for compressed files)"
    )
    rates = ", ".join(
        f"{name} {s['timing']['stored_bytes_per_s_per_core'] / 1e6:.2f} MB/s"
        if s["timing"]["stored_bytes_per_s_per_core"]
        else f"{name} n/a"
        for name, s in plan["sources"].items()
    )
    timing = plan["timing"]
    out.append(f"rate per core (stored bytes read + parsed + tokenized per second, one core of {timing['cpu']}): {rates}")
    out.append(f"hours to prepare ({timing['basis']}, at the rates above; storage throughput and stragglers not modelled):")
    for h in timing["hours"]:
        why = f" (this run's prepare.workers={plan['workers']})" if h["this_run"] else ""
        out.append(
            f"  {h['cores']} cores{why}: " + (_duration(h["hours"]) if h["hours"] is not None else "unknown (nothing sampled)")
        )
    return "\n".join(out)
