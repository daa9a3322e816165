"""What every benchmark shares: reading its files, resuming finished items, progress with an
ETA, and writing `<name>.json` + `<name>.md` into the run directory.

A benchmark module exposes `run_benchmark(cfg, run_dir) -> dict`: it reads its data first
(so a missing file fails before a model loads), scores items through an `Engine`, and calls
`write_result`. `task=report` later reads those JSON files back.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import logging
import time
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
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if name.endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        rows = json.loads(text)
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


class ItemStore:
    """Finished items of one benchmark in `<run_dir>/<name>_partial.jsonl`, appended as they
    finish; a rerun in the same run directory with the same `settings` skips them."""

    def __init__(self, path: Path | None, settings: dict[str, Any]):
        self.path, self.settings = path, json.loads(json.dumps(settings))  # JSON-normal form
        self.done: dict[str, dict] = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the interruption we resume from
                    continue
                if isinstance(record, dict) and record.get("_settings") == self.settings:
                    self.done[record["_id"]] = record["result"]
        if self.done:
            log.info("resuming: %d item(s) already done in %s", len(self.done), path)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.done

    def get(self, item_id: str) -> Any:
        return self.done[item_id]

    def add(self, item_id: str, result: Any) -> None:
        self.done[item_id] = result
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"_id": item_id, "_settings": self.settings, "result": result}) + "\n")


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


def write_result(run_dir: Path, cfg, result: dict, table: str) -> dict:
    """`<eval.name>.json` (the result plus which benchmark, kind and checkpoint) and
    `<eval.name>.md`, and the table on stdout."""
    # How the numbers were computed (kernel, dtypes), beside which model: execution is the command's.
    execution = dataclasses.asdict(cfg.execution)
    result = {"benchmark": cfg.eval.name, "kind": cfg.eval.kind, "checkpoint": str(cfg.checkpoint), "execution": execution, **result}
    (run_dir / f"{cfg.eval.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (run_dir / f"{cfg.eval.name}.md").write_text(table)
    print(table, flush=True)
    return result
