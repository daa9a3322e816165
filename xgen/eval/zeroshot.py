"""Zero-shot common-sense and question-answering tasks, the report's Table 6: ARC-Challenge,
HellaSwag, Winogrande, TruthfulQA (MC), BoolQ, PIQA and OpenBookQA, scored as
lm-evaluation-harness v0.4 scores them (prompts, choices and metrics in `zeroshot_tasks`,
log-likelihoods in `loglik`).

Each task reads `<eval.data_path>/<task>/<split>.jsonl` (or `.jsonl.gz`, `.parquet`): the
Hugging Face dataset's rows with its own field names. Items are scored in chunks, all of a
chunk's requests in one batched call; finished items are kept in `zeroshot_partial.jsonl`
and skipped by a rerun in the same run directory.

The model sits behind `loglik(requests) -> [LogLik]`, so everything but the log-likelihoods
is testable without one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Sequence

from xgen.config import ConfigError
from xgen.eval.common import ItemStore, Progress, markdown, read_records
from xgen.eval.loglik import LogLik
from xgen.eval.zeroshot_tasks import TASKS, Rendered, Task

log = logging.getLogger(__name__)

# Table 6's columns: (task, heading, the metric that fills the column). The report names no
# metric; these are the usual lm-eval choices, those of the Open LLM Leaderboard where it has
# the task: acc_norm (per-character length normalized) for the tasks whose choices differ in
# length and acc_norm is reported (ARC, HellaSwag, PIQA, OpenBookQA); acc for Winogrande
# (its continuation is shared, so normalizing changes nothing) and BoolQ (" no"/" yes");
# MC2 for TruthfulQA (the Leaderboard's, and the TruthfulQA paper's main MC score).
# Every metric lm-eval reports is in zeroshot.json either way.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("arc_challenge", "ARC-C", "acc_norm"),
    ("hellaswag", "HellaSwag", "acc_norm"),
    ("winogrande", "Winogrande", "acc"),
    ("truthfulqa_mc", "TruthfulQA", "mc2"),
    ("boolq", "BoolQ", "acc"),
    ("piqa", "PIQA", "acc_norm"),
    ("openbookqa", "OpenBookQA", "acc_norm"),
)
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
PROTOCOL = "lm-eval-v0.4"  # part of the resume key: results of another protocol are not reused

LogLikFn = Callable[[Sequence[tuple[str, str]]], list[LogLik]]


# ---- data ---------------------------------------------------------------------------------


def selected_tasks(names: Sequence[str]) -> list[Task]:
    """`eval.tasks` in Table 6's order (empty: all seven)."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    wanted = set(names) or set(TASKS)
    return [t for t in TASKS.values() if t.name in wanted]


def task_file(data_path: str | Path, task: Task) -> Path:
    """The task's file; missing: one error naming the expected path."""
    base = Path(data_path) / task.name / task.split
    for suffix in SUFFIXES:
        if (path := base.with_name(base.name + suffix)).is_file():
            return path
    raise ConfigError(
        f"zeroshot: {task.name}'s {task.split} split not found: expected {base}.jsonl "
        f"(or .jsonl.gz, .parquet) with the Hugging Face dataset's fields (eval.data_path={data_path})"
    )


def load_task(data_path: str | Path, task: Task, limit: int | None = None) -> list[Rendered]:
    """The task's first `limit` rows, rendered; a row lacking a field or with an answer that is
    not among its choices is one error naming the file and row."""
    path = task_file(data_path, task)
    rows = read_records(path, f"zeroshot {task.name}")[:limit]
    rendered = []
    for n, row in enumerate(rows, 1):
        try:
            rendered.append(task.render(row))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ConfigError(f"zeroshot: {path} row {n} is not a {task.name} row ({what})") from None
    return rendered


# ---- scoring ------------------------------------------------------------------------------


def score_items(task: Task, items: Sequence[Rendered], loglik: LogLikFn) -> list[dict]:
    """Each item's metrics and log-likelihoods; the items' distinct requests go to `loglik` in
    one call (TruthfulQA's MC1 choices are also among its MC2 ones)."""
    unique = list(dict.fromkeys(req for it in items for req in it.requests))
    answers = dict(zip(unique, loglik(unique)))
    results = []
    for it in items:
        lls = [answers[req].logprob for req in it.requests]
        metrics = task.score(it, lls)
        results.append({"metrics": {m: metrics[m] for m in task.metrics}, "lls": lls})
    return results


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and lm-eval's `mean_stderr` (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def evaluate(
    items: dict[str, list[Rendered]],
    loglik: LogLikFn,
    store: ItemStore,
    chunk: int = 8,
) -> dict[str, dict]:
    """Per task: item count and each metric's mean and stderr. Items already in `store` are
    not scored again; new ones are added to it as their chunk finishes."""
    todo = {name: [i for i in range(len(its)) if f"{name}/{i}" not in store] for name, its in items.items()}
    progress = Progress("zeroshot", sum(len(t) for t in todo.values()))
    for name, indices in todo.items():
        task = TASKS[name]
        for start in range(0, len(indices), max(1, chunk)):
            part = indices[start : start + max(1, chunk)]
            for i, result in zip(part, score_items(task, [items[name][i] for i in part], loglik)):
                store.add(f"{name}/{i}", result)
            progress.advance(len(part), note=name)
    summary = {}
    for name, its in items.items():
        results = [store.get(f"{name}/{i}")["metrics"] for i in range(len(its))]
        entry: dict = {"items": len(results)}
        for metric in TASKS[name].metrics:
            if results:
                entry[metric], entry[f"{metric}_stderr"] = mean_and_stderr([r[metric] for r in results])
        summary[name] = entry
    return summary


# ---- output -------------------------------------------------------------------------------


def table_row(summary: dict[str, dict]) -> dict[str, float | None]:
    """Table 6's cells: heading (metric) -> value, None for a task not run."""
    return {
        f"{title} ({metric})": summary[task].get(metric) if task in summary else None
        for task, title, metric in TABLE_COLUMNS
    }


def markdown_table(summary: dict[str, dict], model: str = "model") -> str:
    """Table 6's layout (in %, the column's metric in its heading), then every metric per task."""
    cells = table_row(summary)
    head = ["Models", *cells]
    first = markdown([head, [model, *("-" if v is None else f"{100 * v:.1f}" for v in cells.values())]])
    metrics = list(dict.fromkeys(m for t in TASKS.values() for m in t.metrics))
    rows = [["Model", "Task", "Items", *metrics]]
    for name, entry in summary.items():
        rows.append([model, name, str(entry["items"]), *(f"{100 * entry[m]:.1f}" if m in entry else "-" for m in metrics)])
    return first + "\n" + markdown(rows)


def read_items(ev) -> dict[str, list[Rendered]]:
    """`eval.tasks`' items (an `EvalConfig`), read and checked: what `task=eval` and the
    training loop's benchmarks (`xgen.eval.inloop`) score."""
    if ev.shots != 0:
        raise ConfigError(f"eval.shots={ev.shots}: eval={ev.name} is zero-shot only (Table 6); leave eval.shots at 0")
    return {t.name: load_task(ev.data_path, t, ev.limit) for t in selected_tasks(ev.tasks)}


def run_benchmark(cfg, run_dir: Path) -> dict:
    """`task=eval eval=zeroshot`: zeroshot.json/.md in `run_dir`, resumable by item."""
    from xgen.eval.common import data_fingerprint, model_identity, model_label, score_settings, write_result
    from xgen.eval.loglik import loglikelihood
    from xgen.generate.load import load_engine

    items = read_items(cfg.eval)  # before the model loads
    model = model_identity(cfg.checkpoint)
    engine = load_engine(cfg)
    store = ItemStore(
        run_dir / f"{cfg.eval.name}_partial.jsonl", {"protocol": PROTOCOL, **score_settings(cfg)},
        model=model, data=data_fingerprint(cfg.eval.data_path),
    )  # fmt: skip
    summary = evaluate(
        items,
        lambda requests: loglikelihood(engine, requests, cfg.eval.batch_size),
        store,
        chunk=cfg.eval.batch_size,
    )
    result = {
        "protocol": PROTOCOL,
        "limit": cfg.eval.limit,
        "max_len": engine.max_len,
        "columns": [{"task": t, "heading": h, "metric": m} for t, h, m in TABLE_COLUMNS],
        "table": table_row(summary),
        "tasks": summary,
        "identity": store.identity,
    }
    result = write_result(run_dir, cfg, result, markdown_table(summary, model_label(cfg)))
    log.info("zero-shot: %s; written to %s", ", ".join(f"{k} {v:.3f}" for k, v in result["table"].items() if v is not None), run_dir)
    return result
