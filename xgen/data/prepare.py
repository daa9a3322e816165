"""`task=prepare`: raw files -> tokenized shards plus a manifest and index per source.

The layout written is `xgen.data.shards`'; the units of work and what each writes are
`xgen.data.units`'; where they run is `xgen.data.engine`'s. This module is the driver: it
plans the units, runs those not yet done, and assembles the manifest from completed units
only, in document order (input path, then byte offset), so the result never depends on the
engine, the number of workers, retries or restarts.

A file is known by its content, digested while its units read it (no second read): a file
whose content is already prepared is not prepared twice (`data_dir=data` against
`$PWD/data`, a renamed or copied file, a copied prepared folder), a file whose content
changed is prepared again (its old shards go), and a file no longer matched by
`raw.paths` leaves the data. An unchanged file is recognised without reading it, by its
size and the store's identity (modification time, ETag, crc32c) cached in the manifest.

While units are outstanding the manifest says `complete: false`, and training refuses the
source; a rerun runs only the units without a completion record.

A source that does not name its text field (`raw.text_field: null`, as `data_mix=files`)
has it found from a sample of its files (`find_text_field`): a field of a usual name, or the
only string field; anything else is a one-line error that lists the fields. The field found
is logged and recorded in the manifest. A mix with `prepare_on_use` is prepared by the
training run that first uses it (`ensure_prepared`), and reused by the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

from xgen.config import ConfigError, DataMixConfig, PrepareConfig, RawInputConfig, SourceConfig
from xgen.data import storage
from xgen.data.engine import engine_session, run_units
from xgen.data.inputs import RawFile, source_files, spread
from xgen.data.readers import text_fields
from xgen.data.shards import (
    FORMAT,
    MANIFEST,
    build_index,
    check_files,
    check_tokenizer,
    index_key,
    new_manifest,
    ordered_shards,
    raw_identity,
    read_json,
    summarize,
    write_json,
)
from xgen.data.units import Unit, UnitJob, plan_units, record_path
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# Names a text column goes by in released corpora and Hugging Face datasets: RedPajama, C4,
# the Pile, Dolma (text); StarCoderData, The Stack (content); RedPajama-V2 (raw_content);
# code sets (code); XSum (document); CNN/DailyMail (article). A file with exactly one of them
# has its text there; with two (text and code), which one is meant cannot be told.
TEXT_FIELDS = ("text", "content", "raw_content", "contents", "code", "body", "document", "article", "markdown")


def _choose(strings: list[str], fields: list[str]) -> tuple[str | None, str]:
    """(the text field of one file, or None; why, or what stands in the way)."""
    usual = [f for f in strings if f in TEXT_FIELDS]
    if len(usual) == 1:
        return usual[0], f"{usual[0]!r}, a usual name for text" + (f", among string fields {', '.join(strings)}" if len(strings) > 1 else "")
    if len(usual) > 1:
        return None, f"has several string fields of usual names for text ({', '.join(usual)})"
    if len(strings) == 1:
        return strings[0], f"{strings[0]!r}, its only string field"
    if not strings:
        return None, f"has no string field (fields: {', '.join(fields) or 'none'})"
    return None, f"has several string fields ({', '.join(strings)}), none of a usual name for text ({', '.join(TEXT_FIELDS)})"


def find_text_field(name: str, spec: RawInputConfig, files: list[RawFile], hint: str) -> tuple[RawInputConfig, str | None]:
    """`spec` with its text field set, and how it was found (None: the config named it, or
    the files are plain text and have none). The field is chosen in each of up to 8 files
    spread over the list, and all must agree; a file with no readable record has no say (the
    prepare counts it). `hint` is the key that names the field (`data_mix.text_field`).
    Anything but one clear answer is a one-line ConfigError listing the fields: a wrong guess
    would train, without a word, on the wrong column."""
    if spec.text_field is not None:
        return spec, None
    answers = {f.path: text_fields(f.path, spec.format) for f in spread(files)}
    answers = {path: fields for path, fields in answers.items() if fields is not None}
    if not answers:
        return spec, None
    chosen: dict[str, tuple[str | None, str]] = {p: _choose(*fields) for p, fields in answers.items() if fields[1]}
    if not chosen:
        raise ConfigError(
            f"data_mix.sources.{name}: no record in the {len(answers)} files sampled to find the text field in "
            f"({next(iter(answers))}, ...); name it: {hint}=<field>"
        )
    for path, (field, why) in chosen.items():
        if field is None:
            strings, fields = answers[path]
            example = next((f for f in strings if f in TEXT_FIELDS), strings[0] if strings else "<field>")
            raise ConfigError(f"data_mix.sources.{name}: which field holds the text? {path} {why}; name it: {hint}={example}")
    fields = sorted({field for field, _ in chosen.values()})
    if len(fields) > 1:
        each = ", ".join(f"{p}: {f}" for p, (f, _) in list(chosen.items())[:4])
        raise ConfigError(
            f"data_mix.sources.{name}: its files hold their text in different fields ({each}); name one: {hint}={fields[0]} "
            "(records without it are counted as missing_field), or give each kind of file its own source"
        )
    field, why = next(iter(chosen.values()))
    unread = len(answers) - len(chosen)
    how = f"found: {why}; {len(answers)} of {len(files)} files sampled" + (f", {unread} without a readable record" if unread else "")
    # A field of an unusual name may be a title or a URL: said as a warning, not in passing.
    say = log.info if field in TEXT_FIELDS else log.warning
    say("data_mix.sources.%s: the text is field %r (%s; %s=<field> names another)", name, field, how, hint)
    return dataclasses.replace(spec, text_field=field), how


def _open_manifest(
    name: str, root: str, spec: RawInputConfig, tokenizer: Tokenizer, min_doc_tokens: int, opts: PrepareConfig
) -> dict:
    """The manifest to continue, or a new one; data prepared differently is refused."""
    path = storage.join(root, MANIFEST)
    if not storage.exists(path):
        return new_manifest(name, tokenizer, spec, min_doc_tokens, opts.count_tokens_by, opts.split_bytes)
    manifest = read_json(path)
    check_tokenizer(manifest, tokenizer, root)
    ours = (raw_identity(spec), min_doc_tokens, opts.split_bytes)
    theirs = (manifest["raw"], manifest["min_doc_tokens"], manifest["split_bytes"])
    if ours != theirs:
        raise ConfigError(
            f"{root} was prepared with raw={theirs[0]}, min_doc_tokens={theirs[1]} and prepare.split_bytes={theirs[2]}, "
            f"this run says raw={ours[0]}, min_doc_tokens={ours[1]} and prepare.split_bytes={ours[2]}; "
            "prepare into another directory: "
            + ("data_mix.name=<another name> (data_mix=files prepares into <data_dir>/prepared/<data_mix.name>)"
               if name == "files" else f"data_mix.sources.{name}.path=<another directory>")
        )  # fmt: skip
    return manifest


def _progress(name: str, total: int):
    """A function to call per finished unit: logs a line every 10 s (and at the end) with
    units done and the read rate."""
    t0 = last = time.perf_counter()
    state = {"units": 0, "bytes": 0, "tokens": 0}

    def tick(record: dict) -> None:
        nonlocal last
        state["units"] += 1
        state["bytes"] += record["counts"].get("raw_bytes", 0)
        state["tokens"] += record["tokens"]
        now = time.perf_counter()
        if now - last >= 10 or state["units"] == total:
            last = now
            log.info(
                "prepare %s: %d/%d units, %.1f MB read at %.2f MB/s, %d tokens",
                name, state["units"], total, state["bytes"] / 1e6, state["bytes"] / 1e6 / max(now - t0, 1e-9), state["tokens"],
            )  # fmt: skip

    return tick


def _file_entry(records: list[dict]) -> tuple[str, dict]:
    """(content digest, manifest entry) of one file from its units' records, in range order."""
    records = sorted(records, key=lambda r: r["index"])
    if len(records) == 1:
        digest = records[0]["digest"]
    else:
        digest = hashlib.blake2b("".join(r["digest"] for r in records).encode(), digest_size=16).hexdigest()
    counts: Counter = Counter()
    tokens_by: dict[str, Counter] = {}
    dropped_by: dict[str, Counter] = {}
    for r in records:
        counts.update(r["counts"])
        for f, c in r["tokens_by"].items():
            tokens_by.setdefault(f, Counter()).update(c)
        for f, c in r["dropped_short_by"].items():
            dropped_by.setdefault(f, Counter()).update(c)
    return digest, {
        "paths": [records[0]["path"]],
        "units": [r["id"] for r in records],
        "shards": [s for r in records for s in r["shards"]],
        "documents": sum(r["documents"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "counts": dict(sorted(counts.items())),
        "tokens_by": {f: dict(sorted(c.items())) for f, c in tokens_by.items()},
        "dropped_short_by": {f: dict(sorted(c.items())) for f, c in dropped_by.items() if c},
    }


def _drop_damaged(name: str, root: str, manifest: dict) -> bool:
    """Forget files whose shards are missing or damaged (the check training makes), with their
    units' records, so that they are prepared again; whether an index file is damaged. A file
    whose raw data is gone cannot be redone: that is an error, never a smaller corpus."""
    if not manifest["files"]:
        return False
    bad = check_files(root, manifest, record=False)
    bad_units = {entry["name"].rsplit("-", 1)[0] for folder, entry, _ in bad if folder == "shards"}
    for digest, entry in list(manifest["files"].items()):
        if not bad_units & set(entry["units"]):
            continue
        if not any(storage.exists(p) for p in entry["paths"]):
            raise ConfigError(
                f"data_mix.sources.{name}: shards of {entry['paths'][0]} in {root} are missing or damaged and the raw "
                "file is gone: restore it (or the shards) to prepare it again"
            )
        log.warning("prepare %s: %s has missing or damaged shards: preparing it again", name, entry["paths"][0])
        for unit in entry["units"]:
            storage.remove(record_path(root, unit))
        del manifest["files"][digest]
    return any(folder == "index" for folder, _, _ in bad)


def _done_records(root: str, units: list[Unit]) -> dict[str, dict]:
    """Completion records of planned units left by an earlier (interrupted) run."""
    listed = storage.listing(storage.join(root, "units"))
    return {u.id: read_json(record_path(root, u.id)) for u in units if f"{u.id}.json" in listed}


def _remove_unreferenced(root: str, manifest: dict, keep_units: set[str]) -> None:
    """Delete shards, records and staging folders that neither the manifest nor a unit
    still to be assembled names: an interrupted unit's output, a changed file's old shards."""
    names = {s["name"] for s in ordered_shards(manifest)}
    units = {u for e in manifest["files"].values() for u in e["units"]} | keep_units
    shard_dir, unit_dir = storage.join(root, "shards"), storage.join(root, "units")
    for file in storage.listing(shard_dir):
        stem = file.split(".")[0]
        if stem not in names and stem.rsplit("-", 1)[0] not in units:
            storage.remove(storage.join(shard_dir, file))
    for file in storage.listing(unit_dir):
        if file.removesuffix(".json") not in units:
            storage.remove(storage.join(unit_dir, file))
    if not storage.is_url(root):
        for stage in Path(shard_dir).glob(".stage-*"):
            shutil.rmtree(stage, ignore_errors=True)


def prepare_source(
    name: str, out_dir: str | Path, spec: RawInputConfig, tokenizer: Tokenizer, min_doc_tokens: int, opts: PrepareConfig,
    text_field_found: str | None = None,
) -> dict:  # fmt: skip
    """Prepare every not-yet-done unit of one source; returns the manifest's totals.
    `text_field_found`: how `find_text_field` found `spec.text_field` (recorded in the manifest)."""
    if spec.text_field is None:
        spec, text_field_found = find_text_field(name, spec, source_files(name, spec).files, f"data_mix.sources.{name}.raw.text_field")
    root = str(out_dir)
    storage.makedirs(root)
    manifest = _open_manifest(name, root, spec, tokenizer, min_doc_tokens, opts)
    index_damaged = _drop_damaged(name, root, manifest)
    expanded = source_files(name, spec)
    for link in expanded.dangling_symlinks:
        log.warning("prepare %s: %s is a dangling symlink: skipped", name, link)
    stats = {f.path: storage.stat(f.path) for f in expanded.files}
    cache = manifest["stat_cache"]
    digests: dict[str, str] = {}  # path -> content digest, for every current input
    todo: list[RawFile] = []
    for f in expanded.files:
        hit = cache.get(f.path)
        if hit is not None and hit[:2] == list(stats[f.path]) and hit[2] in manifest["files"]:
            digests[f.path] = hit[2]
        else:
            todo.append(f)
    units = [u for f in todo for u in plan_units(f.path, f.parts, stats[f.path], spec, opts.split_bytes)]
    records = _done_records(root, units)
    jobs = [_job(u, root, spec, min_doc_tokens, manifest, opts, tokenizer) for u in units if u.id not in records]
    log.info(
        "prepare %s: %d files, %d already prepared; %d units to run, %d done by an earlier run (engine=%s, workers=%d)",
        name, len(expanded.files), len(digests), len(jobs), len(records), opts.engine, opts.workers,
    )  # fmt: skip
    if jobs:
        manifest["complete"], manifest["pending"] = False, sorted(j.unit.id for j in jobs)
        write_json(storage.join(root, MANIFEST), manifest)  # training refuses the source until the end
        _remove_unreferenced(root, manifest, {u.id for u in units})
    tick = _progress(name, len(jobs))
    for record in run_units(jobs, opts):
        records[record["id"]] = record
        tick(record)
    _assemble(name, manifest, expanded, todo, units, records, digests, stats)
    if index_damaged or manifest.get("index", {}).get("of") != index_key(manifest):
        manifest["index"] = build_index(root, manifest)
    manifest["totals"] = summarize(manifest)
    named = "named in the config" if spec.text_field is not None else "none: plain text files"
    manifest["text_field"] = {"field": spec.text_field, "how": text_field_found or named}
    manifest["complete"], manifest["pending"] = True, []
    write_json(storage.join(root, MANIFEST), manifest)
    _remove_unreferenced(root, manifest, set())
    totals = manifest["totals"]
    if not totals.get("documents"):
        problems = {k: v for k, v in totals.items() if isinstance(v, int) and v and k not in ("files", "shards", "units", "raw_bytes")}
        short = f", data_mix.min_doc_tokens={min_doc_tokens}" if totals.get("dropped_short") else ""
        raise ConfigError(
            f"data_mix.sources.{name}: {totals['files']} files under {spec.paths} gave no document ({problems}); "
            f"check raw.text_field={spec.text_field!r}{short} and raw.format"
        )
    return totals


def _job(
    unit: Unit, root: str, spec: RawInputConfig, min_doc_tokens: int, manifest: dict, opts: PrepareConfig, tokenizer: Tokenizer
) -> UnitJob:  # fmt: skip
    return UnitJob(
        unit, root, spec, min_doc_tokens, tuple(manifest["meta_fields"]), tuple(manifest["count_tokens_by"]),
        opts.shard_tokens, opts.batch_documents, manifest["token_dtype"], tokenizer.encoding.name,
    )  # fmt: skip


def _assemble(
    name: str, manifest: dict, expanded, todo: list[RawFile], units: list[Unit], records: dict[str, dict],
    digests: dict[str, str], stats: dict,
) -> None:  # fmt: skip
    """Fold the new files' units into the manifest: a content already there gains a path
    (renamed or copied), a changed file's old entry goes, a file no longer matched leaves."""
    by_path: dict[str, list[dict]] = {}
    for u in units:
        by_path.setdefault(u.path, []).append(records[u.id])
    new: dict[str, dict] = {}
    for f in todo:  # in path order: the first of several identical files is the one kept
        digest, entry = _file_entry(by_path[f.path])
        digests[f.path] = digest
        if digest in manifest["files"] or digest in new:
            continue
        new[digest] = entry
    current = set(digests.values())
    for digest, entry in list(manifest["files"].items()):
        if digest in current:
            continue
        changed = [p for p in entry["paths"] if p in digests]
        unmatched = [p for p in entry["paths"] if p not in digests and storage.exists(p)]
        if changed:
            log.warning("prepare %s: %s changed since it was prepared: preparing it again", name, changed[0])
        elif unmatched:
            log.warning("prepare %s: %s is no longer in raw.paths: its documents are removed", name, unmatched[0])
        else:
            continue  # raw data deleted once prepared: its documents stay
        del manifest["files"][digest]
    manifest["files"].update(new)
    for path, digest in digests.items():
        paths = manifest["files"][digest]["paths"]
        if path not in paths:
            paths.append(path)  # the same content under another name: nothing to redo
            paths.sort()
    copies = Counter(digests.values())
    for path in sorted(digests):
        if copies[digests[path]] > 1 and manifest["files"][digests[path]]["paths"][0] != path:
            log.warning("prepare %s: %s has the same content as another input: its documents are kept once", name, path)
    manifest["stat_cache"] = {p: [*stats[p], digests[p]] for p in sorted(digests)}
    skipped = {"dangling_symlinks": len(expanded.dangling_symlinks), "duplicate_files": len(digests) - len(current)}
    manifest["skipped"] = {k: v for k, v in skipped.items() if v}


def text_field_key(mix: DataMixConfig, name: str) -> str:
    """The key that names a source's text field on the command line: `data_mix.text_field`
    for a source that reads `data_mix.paths` (data_mix=files), else the source's own."""
    raw = mix.sources[name].raw
    return "data_mix.text_field" if mix.paths and raw is not None and list(raw.paths) == list(mix.paths) else f"data_mix.sources.{name}.raw.text_field"


def sources_to_prepare(mix: DataMixConfig, found: dict[str, str] | None = None) -> dict[str, SourceConfig]:
    """The sources `prepare` writes, by name: those with kind=prepared and raw inputs, one per
    prepared `path` (subsets of one release selected by `where` share it and are prepared
    once); sources sharing a path but reading their raw files differently are refused. A
    source without a text field has it found here (`find_text_field`), and how goes into
    `found` by source name."""
    todo = {name: src for name, src in mix.sources.items() if src.kind == "prepared" and src.raw is not None}
    if not todo:
        raise ConfigError(f"data_mix={mix.name} has no source with kind=prepared and raw inputs to prepare")
    for name, src in todo.items():
        if src.raw.text_field is None:
            raw, how = find_text_field(name, src.raw, source_files(name, src.raw).files, text_field_key(mix, name))
            todo[name] = dataclasses.replace(src, raw=raw)
            if how is not None and found is not None:
                found[name] = how
    by_path: dict[str, str] = {}
    for name, src in todo.items():
        first = by_path.setdefault(src.path, name)
        same = (raw_identity(todo[first].raw), list(todo[first].raw.paths)) == (raw_identity(src.raw), list(src.raw.paths))
        if not same:
            raise ConfigError(f"data_mix.sources.{first} and .{name} share path {src.path} but read their raw files differently")
    return {name: todo[name] for name in by_path.values()}


def prepare_mix(mix: DataMixConfig, tokenizer: Tokenizer, opts: PrepareConfig) -> dict[str, dict]:
    """Prepare every source of the mixture that names raw inputs (`sources_to_prepare`)."""
    found: dict[str, str] = {}
    todo = sources_to_prepare(mix, found)
    with engine_session(opts):  # one Ray for all sources
        return {
            name: prepare_source(name, src.path, src.raw, tokenizer, mix.min_doc_tokens, opts, found.get(name))
            for name, src in todo.items()
        }


def _up_to_date(src: SourceConfig, files: list[RawFile], tokenizer: Tokenizer, min_doc_tokens: int, opts: PrepareConfig) -> dict | None:
    """The totals of a source whose prepared data is complete and made from exactly these
    files (each one's size and store identity as cached when it was prepared) with these
    settings; None when a prepare has anything to do (which it then decides file by file)."""
    path = storage.join(src.path, MANIFEST)
    if not storage.exists(path):
        return None
    manifest = read_json(path)
    same = (
        manifest.get("format") == FORMAT
        and manifest.get("tokenizer", {}).get("identity") == tokenizer.identity
        and manifest.get("complete")
        and (manifest.get("raw"), manifest.get("min_doc_tokens"), manifest.get("split_bytes"))
        == (raw_identity(src.raw), min_doc_tokens, opts.split_bytes)
    )
    cache = manifest.get("stat_cache", {})
    if not same or set(cache) != {f.path for f in files}:
        return None
    for f in files:
        hit = cache[f.path]
        if hit[:2] != list(storage.stat(f.path)) or hit[2] not in manifest["files"]:
            return None
    return manifest["totals"]


def describe(name: str, path: str, totals: dict, min_doc_tokens: int) -> str:
    """One line for a person: a prepared source's files, documents, tokens and shards, where
    they are, and what was left out and why (the manifest has every count)."""
    words = {
        "dropped_short": ("document", f"under data_mix.min_doc_tokens={min_doc_tokens}"),
        "missing_field": ("record", "without the text field"),
        "malformed_json": ("malformed JSON record", ""),
        "invalid_utf8": ("record", "not in UTF-8"),
        "empty_files": ("empty file", ""),
        "corrupt_files": ("corrupt or truncated file", ""),
        "dangling_symlinks": ("dangling symlink", ""),
        "duplicate_files": ("file", "that copies another"),
    }
    left = [_count(totals[k], *w) for k, w in words.items() if totals.get(k)]
    held = ", ".join(_count(totals.get(k, 0), k.removesuffix("s")) for k in ("files", "documents", "tokens"))
    return f"data_mix.sources.{name}: {held} in {_count(totals.get('shards', 0), 'shard')} at {path}" + (
        f"; left out: {', '.join(left)}" if left else ""
    )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _count(n: int, noun: str, rest: str = "") -> str:
    """`1 file`, `2 files`, `3 records without the text field`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}" + (f" {rest}" if rest else "")


def ensure_prepared(mix: DataMixConfig, tokenizer: Tokenizer, opts: PrepareConfig, *, process_count: int = 1) -> dict[str, dict]:
    """For a mix with `prepare_on_use` (data_mix=files): prepare, at the start of a training
    run, each raw source whose prepared data is missing or not made from its current files
    (`prepare_source`'s rules decide what is redone), saying where the shards go and what
    they hold; reuse, without writing anything, those that are. Returns each source's totals
    ({} for other mixes: a corpus of terabytes is prepared by `task=prepare`, on workers or a
    cluster, never as a side effect of a training run). A run of several processes does
    not prepare (each would): it is told to run `task=prepare` first."""
    if not mix.prepare_on_use or not any(s.kind == "prepared" and s.raw is not None for s in mix.sources.values()):
        return {}
    found: dict[str, str] = {}
    todo = sources_to_prepare(mix, found)
    files = {name: source_files(name, src.raw).files for name, src in todo.items()}
    result, stale = {}, []
    for name, src in todo.items():
        totals = _up_to_date(src, files[name], tokenizer, mix.min_doc_tokens, opts)
        if totals is None:
            stale.append(name)
        else:
            result[name] = totals
            log.info("reusing %s (prepared before for these files)", describe(name, src.path, totals, mix.min_doc_tokens))
    if stale and process_count > 1:
        raise ConfigError(
            f"data_mix={mix.name}: {', '.join(stale)} not prepared for these files, and this run has {process_count} processes; "
            f"prepare first, on one: python -m xgen.run task=prepare data_mix={mix.name} <the same data_mix overrides>"
        )
    with engine_session(opts) if stale else contextlib.nullcontext():
        for name in stale:
            src = todo[name]
            size = sum(storage.stat(f.path)[0] for f in files[name])
            log.info(
                "data_mix.sources.%s: preparing %s (%s) into %s: tokenized once, reused by later runs",
                name, _count(len(files[name]), "file"), _size(size), src.path,
            )  # fmt: skip
            result[name] = prepare_source(name, src.path, src.raw, tokenizer, mix.min_doc_tokens, opts, found.get(name))
            log.info("prepared %s", describe(name, src.path, result[name], mix.min_doc_tokens))
    return result
