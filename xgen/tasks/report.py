"""task=report: every evaluation under a directory, on one Markdown page in the report's order.

    python -m xgen.run task=report run_dir=outputs/eval          # writes outputs/eval/report.md
    python -m xgen.run task=report run_dir=outputs out=report.md

It finds each benchmark's `<eval.name>.json` (written by task=eval, which also wrote the
table beside it as `<eval.name>.md`) and `carbon.json` (task=carbon), in `run_dir` or any
directory below it. Runs of the same benchmark on several checkpoints become rows of one
table; figures (`<eval.name>*.png`) are linked relative to the page. Nothing is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from xgen.config import ConfigError, XGenConfig

log = logging.getLogger(__name__)


@dataclass
class Found:
    """One benchmark's results across runs: its heading and the tables and figures to merge."""

    order: float
    title: str
    tables: list[str] = field(default_factory=list)  # each run's Markdown
    figures: list[Path] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)


def heading(result: dict) -> tuple[float, str]:
    """(position in the report, heading) of a result, from its benchmark kind."""
    kind = result.get("kind")
    if kind == "mmlu":
        shots = result.get("shots", 0)
        return (5, "Table 5: MMLU zero-shot") if shots == 0 else (4, f"Table 4: MMLU {shots}-shot")
    known = {
        "zeroshot": (6, "Table 6: zero-shot common-sense tasks"),
        "humaneval": (7, "Table 7: HumanEval"),
        "ppl_by_position": (7.5, "Figure 2: perplexity by token position"),
        "passkey": (7.6, "Passkey retrieval by prompt length and depth"),
        "alpaca_eval": (8, "Table 8: AlpacaEval"),
        "mt_bench": (9, "Tables 9 and 10: MT-Bench"),
        "longform_qa": (11, "Tables 11 and 12: long-form QA"),
        "summarization": (13, "Table 13: dialogue summarization"),
        "carbon": (20, "Section 6: carbon footprint"),
    }
    return known.get(kind, (15, f"{result.get('benchmark', kind)}"))


def _blocks(markdown: str) -> list[list[str]]:
    """The text as blocks: each table (consecutive `|` lines) is one block, other lines one each."""
    blocks: list[list[str]] = []
    for line in markdown.rstrip("\n").splitlines():
        if line.startswith("|") and blocks and blocks[-1] and blocks[-1][0].startswith("|"):
            blocks[-1].append(line)
        else:
            blocks.append([line])
    return blocks


def merge_tables(tables: list[str]) -> str:
    """One run's page with the other runs' table rows appended to each of its tables (when
    the runs' pages have the same layout; otherwise the pages one after another)."""
    first = _blocks(tables[0])
    merged = [list(b) for b in first]
    for other in tables[1:]:
        blocks = _blocks(other)
        same = len(blocks) == len(first) and all(a[0] == b[0] for a, b in zip(first, blocks))
        if not same:
            return "\n\n".join(t.rstrip("\n") for t in tables) + "\n"
        for m, b in zip(merged, blocks):
            if b[0].startswith("|"):
                m += [row for row in b[2:] if row not in m]
    return "\n".join(line for b in merged for line in b) + "\n"


def carbon_table(result: dict) -> str:
    rows = [
        ("Chip-hours", f"{result['chip_hours']:,.1f}", result.get("chip_hours_source", "")),
        ("Chip power (W) x PUE", f"{result['chip_power_w']:g} x {result['pue']:g}", ""),
        ("Energy (MWh)", f"{result['mwh']:.3f}", ""),
        ("Emissions (tCO2eq)", f"{result['tco2eq']:.3f}", f"at {result['tco2_per_mwh']:g} t/MWh"),
    ]
    lines = ["| Quantity | Value | Note |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def gather(root: Path) -> list[Found]:
    """Every result under `root`, grouped by benchmark name, in the report's order."""
    found: dict[str, Found] = {}
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith(".") or ".hydra" in path.parts:
            continue
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            log.warning("report: skipping unreadable %s (%s)", path, e)
            continue
        if not isinstance(result, dict):
            continue
        if path.name == "carbon.json" and "tco2eq" in result:
            name, result = "carbon", {**result, "kind": "carbon"}
            table = carbon_table(result)
        elif "benchmark" in result and "kind" in result:
            name, md = result["benchmark"], path.with_suffix(".md")
            if not md.is_file():
                log.warning("report: %s has no table beside it (%s); skipped", path, md.name)
                continue
            table = md.read_text()
        else:
            continue
        order, title = heading(result)
        entry = found.setdefault(name, Found(order, title))
        entry.tables.append(table)
        entry.sources.append(path)
        entry.figures += sorted(p for p in path.parent.glob(f"{name}*.png"))
    return sorted(found.values(), key=lambda f: (f.order, f.title))


def render(found: list[Found], page_dir: Path) -> str:
    parts = ["# Evaluation report\n"]
    for entry in found:
        parts.append(f"## {entry.title}\n")
        parts.append(merge_tables(entry.tables))
        for figure in entry.figures:
            parts.append(f"![{entry.title}]({Path(os.path.relpath(figure, page_dir)).as_posix()})\n")
        sources = ", ".join(f"`{Path(os.path.relpath(s, page_dir)).as_posix()}`" for s in entry.sources)
        parts.append(f"Source: {sources}\n")
    return "\n".join(parts)


def run(cfg: XGenConfig, run_dir: Path) -> Path:
    if cfg.run_dir is None:
        raise ConfigError("task=report needs run_dir=<directory holding task=eval and task=carbon runs>")
    root = Path(cfg.run_dir).resolve()
    if not root.is_dir():
        raise ConfigError(f"run_dir={root}: no such directory")
    found = gather(root)
    if not found:
        raise ConfigError(f"run_dir={root}: no evaluation results (<eval.name>.json from task=eval, carbon.json) in it or below")
    page = Path(cfg.out) if cfg.out else root / "report.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    text = render(found, page.parent.resolve())
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, page)
    print(text, flush=True)
    log.info("report of %d benchmark(s) written to %s", len(found), page)
    return page
