"""What every benchmark shares: reading its files, resuming finished items, progress with an
ETA, and writing `<name>.json` + `<name>.md` into the run directory.

A benchmark module exposes `run_benchmark(cfg, run_dir) -> dict`: it reads its data first
(so a missing file fails before a model loads), scores items through an `Engine`, and calls
`write_result`. `task=report` later reads those JSON files back.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from xgen.config import ConfigError

log = logging.getLogger(__name__)


def require_file(path: str | Path, what: str, setting: str = "eval.data_path") -> Path:
    """`path` if it is a file, else one line naming the file, where it was expected and why."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: expected {path} (set {setting})")
    return path


def read_text(path: Path, what: str) -> str:
    """A file's UTF-8 text (gunzipped if it ends in .gz); a damaged gzip stream or a byte that
    is not UTF-8 is one line naming the file (and the line)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path) as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # unreadable; or not gzip, truncated, a bad CRC
        how = "as gzip " if path.name.endswith(".gz") else ""
        raise ConfigError(f"{what}: {path} cannot be read {how}({e or type(e).__name__})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what}: {path} line {line} is not UTF-8 (byte 0x{data[e.start]:02x})") from None


def read_records(path: str | Path, what: str) -> list[dict]:
    """Rows of a JSON Lines (optionally .gz), JSON array or Parquet file, as dicts; a line that
    is not a JSON object is one error naming the file and line."""
    path = require_file(path, what)
    name = path.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow is in the dev and parquet extras
            raise ConfigError(f"{what}: {path} is Parquet; install xgen[parquet]") from e
        return pq.read_table(path).to_pylist()
    text = read_text(path, what)
    if name.endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what}: {path} line {e.lineno} is not JSON ({e.msg})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise ConfigError(f"{what}: {path} is a JSON array but not of objects")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what}: {path} line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{what}: {path} line {n} is not a JSON object")
        rows.append(row)
    return rows


def data_fingerprint(path: str | Path, suffixes: tuple[str, ...] = ()) -> str:
    """sha256 over a benchmark's files (a file, or every file under a directory, or those
    ending in `suffixes`, with its relative path): a result is reused only for the data
    that made it."""
    root = Path(path)
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and (not suffixes or p.name.endswith(suffixes)))
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(root) if p != root else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def model_identity(checkpoint_path: str | Path) -> dict:
    """Which model a result belongs to, known without loading it: an xgen checkpoint's
    parameter fingerprints (taken at save and verified when the model loads), with its
    directory and step; or a Hugging Face directory's config and weight files."""
    from xgen import checkpoint

    if checkpoint_path is None:
        raise ConfigError("task=eval needs checkpoint=<run dir, checkpoint dir or Hugging Face dir>")
    path = Path(checkpoint_path).resolve()
    if not path.exists():
        raise ConfigError(f"checkpoint={checkpoint_path}: no such directory")
    if (path / "config.json").is_file():
        return {"checkpoint": str(path), "step": None, "params": data_fingerprint(path, ("config.json", ".safetensors", ".bin"))}
    directory, step = checkpoint.newest(path)
    recorded = checkpoint.read_meta_at(directory, step).get("fingerprints") or {}
    prints = sorted((k, v) for k, v in recorded.items() if k.startswith("['params']"))
    if not prints:
        log.warning("checkpoint %s/%d has no fingerprints: its results are tied to its path and step only", directory, step)
    digest = hashlib.sha256(json.dumps(prints).encode()).hexdigest()[:16] if prints else None
    return {"checkpoint": str(directory), "step": step, "params": digest}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key old -> new` for each leaf that differs between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix} {old!r} -> {new!r}"]


class ItemStore:
    """Finished items of one benchmark in `<run_dir>/<name>_partial.jsonl`, appended as they
    finish. Each record carries the identity of what made it: the model (its parameters'
    fingerprint, path and step), the data's fingerprint and every setting that changes a
    score. A rerun reuses only records of the same identity; any others are counted and
    logged with what differs, and moved aside with the file (`<name>_partial.stale-N.jsonl`)."""

    def __init__(self, path: Path | None, settings: dict[str, Any], *, model: dict | None = None, data: str | None = None):
        self.path = path
        self.identity = json.loads(json.dumps({"model": model, "data": data, "settings": settings}))  # JSON-normal form
        self.done: dict[str, dict] = {}
        if path is None or not path.exists():
            return
        stale, other = 0, None
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption we resume from
                continue
            if not isinstance(record, dict) or "_id" not in record:
                continue
            if record.get("_identity") == self.identity:
                self.done[record["_id"]] = record["result"]
            else:
                stale += 1
                other = other or record.get("_identity")
        if stale:
            aside = next(path.with_name(f"{path.stem}.stale-{k}.jsonl") for k in itertools.count(1)
                         if not path.with_name(f"{path.stem}.stale-{k}.jsonl").exists())  # fmt: skip
            path.rename(aside)
            what = "; ".join(_differences(other, self.identity)) if isinstance(other, dict) else "written before results carried their identity"
            log.warning(
                "%s: %d result(s) were made by another model, data or settings (%s); not reused, moved to %s",
                path, stale, what, aside.name,
            )
            for item_id, result in self.done.items():
                self._append(item_id, result)
        if self.done:
            log.info("resuming: %d item(s) already done in %s", len(self.done), path)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.done

    def get(self, item_id: str) -> Any:
        return self.done[item_id]

    def add(self, item_id: str, result: Any) -> None:
        self.done[item_id] = result
        self._append(item_id, result)

    def _append(self, item_id: str, result: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"_id": item_id, "_identity": self.identity, "result": result}) + "\n")


class Progress:
    """Logs `<label>: done/total, ETA` at most every `every_s` seconds (and at the end)."""

    def __init__(self, label: str, total: int, every_s: float = 10.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.done, self.start, self.last = 0, time.time(), 0.0

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d%s, ETA %.0f s", self.label, self.done, self.total, f" ({note})" if note else "", eta)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of `size` items (the last one shorter); itertools.batched from Python 3.12."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def input_budget(max_len: int, max_new_tokens: int, max_input_tokens: int | None) -> int:
    """The longest prompt: what the model's length leaves after the answer, or
    `eval.max_input_tokens` if smaller."""
    room = max_len - max_new_tokens
    budget = min(room, max_input_tokens) if max_input_tokens else room
    if budget < 1:
        raise ConfigError(
            f"eval.max_new_tokens={max_new_tokens} leaves no room for input in the model's {max_len} "
            "tokens (lower it or raise generate.max_len)"
        )
    return budget


TRUNCATION_SIDES = ("left", "right", "middle")


def check_truncation(side: str) -> str:
    if side not in TRUNCATION_SIDES:
        raise ConfigError(f"eval.truncation={side!r} is not one of {', '.join(TRUNCATION_SIDES)}")
    return side


def truncate_tokens(ids: Sequence[int], keep: int, side: str) -> list[int]:
    """`keep` of `ids`, dropping from `side` (`eval.truncation`): left keeps the end, right
    the start, middle the first ceil(keep/2) and the last floor(keep/2)."""
    check_truncation(side)
    ids, keep = list(ids), max(0, keep)
    if keep >= len(ids):
        return ids
    if side == "left":
        return ids[len(ids) - keep :]
    if side == "right":
        return ids[:keep]
    tail = keep // 2
    return ids[: keep - tail] + ids[len(ids) - tail :]


def markdown(rows: list[list[str]]) -> str:
    """A Markdown table: the first row is the header."""
    rows = [rows[0], ["---"] * len(rows[0]), *rows[1:]]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def model_label(cfg) -> str:
    """A short name for the model in tables: the checkpoint's directory name."""
    path = Path(str(cfg.checkpoint or "model"))
    return path.name or str(path)


def score_settings(cfg) -> dict:
    """What every model-scored number depends on beyond the benchmark's own settings: the
    tokenizer, the context asked for, and how the model runs (kernel, dtypes as resolved)."""
    from xgen.runtime import compute_dtype_name

    execution = {k: v for k, v in dataclasses.asdict(cfg.execution).items() if k != "name"}
    compute = compute_dtype_name(cfg.execution, cfg.hardware)
    execution.update(compute_dtype=compute, kv_cache_dtype=cfg.execution.kv_cache_dtype or compute)
    return {"tokenizer": cfg.tokenizer.name, "max_len": cfg.generate.max_len, "execution": execution,
            "normalize_over_all_rows": cfg.eval.normalize_over_all_rows}  # fmt: skip


def write_result(run_dir: Path, cfg, result: dict, table: str) -> dict:
    """`<eval.name>.json` (the result plus which benchmark, kind and checkpoint, and, under
    `identity`, the model, data and settings that made it) and `<eval.name>.md`, and the
    table on stdout."""
    # How the numbers were computed (kernel, dtypes), beside which model: execution is the command's.
    execution = dataclasses.asdict(cfg.execution)
    result = {"benchmark": cfg.eval.name, "kind": cfg.eval.kind, "checkpoint": str(cfg.checkpoint), "execution": execution, **result}
    (run_dir / f"{cfg.eval.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (run_dir / f"{cfg.eval.name}.md").write_text(table)
    print(table, flush=True)
    return result
