"""Long dialogue summarization (the XGen-7B report's Table 13): an instruction model writes a
summary of a meeting transcript (AMI) or a TV-episode transcript (SummScreen's
ForeverDreaming and TVMegaSite), with inputs up to 8K tokens; scored by ROUGE-1/2/L F-measure
against the reference, averaged per dataset.

Data: `<eval.data_path>/<task>.jsonl` (or .jsonl.gz, .json, .parquet) for each task in
`eval.tasks` (default: ami, forever_dreaming, tv_mega_site), one `{"id", "dialogue",
"summary"}` row per transcript. The prompt is the chat template around `INSTRUCTION` + a blank
line + the transcript; a transcript too long for `eval.max_input_tokens` (the whole prompt;
default what the model's length leaves after `eval.max_new_tokens`) loses tokens on the
`eval.truncation` side: left (keep the end), right (keep the start) or middle (keep both
ends, as LongBench does). Decoding is greedy by default and stops where the template's
assistant turn ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from xgen.config import ConfigError
from xgen.eval.common import (
    ItemStore,
    Progress,
    batched,
    check_truncation,
    data_fingerprint,
    input_budget,
    markdown,
    model_identity,
    model_label,
    read_records,
    score_settings,
    truncate_tokens,
    write_result,
)

log = logging.getLogger(__name__)

WHAT = "summarization"
# Sub-task -> its column group in Table 13.
TASKS = {"ami": "AMI", "forever_dreaming": "ForeverDreaming", "tv_mega_site": "TVMegaSite"}
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# One instruction for all three datasets (the report gives none): a plain request for a
# summary of the whole transcript, as an instruction-tuned model is asked in everyday use.
INSTRUCTION = "Summarize the following transcript. Cover the main topics, events and decisions, and who was involved."


@dataclass(frozen=True)
class Dialogue:
    task: str
    id: str
    dialogue: str
    summary: str  # the reference


# ---- data -------------------------------------------------------------------------------


def task_file(data_path: str | Path, task: str) -> Path:
    """`<data_path>/<task>.jsonl` or another format's suffix; a one-line error if none."""
    for suffix in SUFFIXES:
        path = Path(data_path) / f"{task}{suffix}"
        if path.is_file():
            return path
    raise ConfigError(f"{WHAT}: task {task!r} not found: expected {Path(data_path) / (task + '.jsonl')} (eval.data_path, eval.tasks)")


def read_task(data_path: str | Path, task: str, limit: int | None = None) -> list[Dialogue]:

    path = task_file(data_path, task)
    items, seen = [], set()
    for n, row in enumerate(read_records(path, WHAT), 1):
        if not all(isinstance(row.get(k), str) for k in ("dialogue", "summary")) or row.get("id") is None:
            raise ConfigError(f"{WHAT}: {path} record {n} needs 'id', and 'dialogue' and 'summary' strings")
        item_id = str(row["id"])
        if item_id in seen:
            raise ConfigError(f"{WHAT}: {path} record {n} repeats id {item_id!r}")
        seen.add(item_id)
        items.append(Dialogue(task, item_id, row["dialogue"], row["summary"]))
    return items[:limit]


# ---- prompts ----------------------------------------------------------------------------


def _messages(dialogue: str, instruction: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction + "\n\n" + dialogue}]


def build_prompt(template, dialogue: str, instruction: str = INSTRUCTION) -> str:
    from xgen.generate.chat import render_prompt

    return render_prompt(template, _messages(dialogue, instruction))


def prompt_ids(tokenizer, template, dialogue: str, instruction: str = INSTRUCTION) -> list[int]:
    """`build_prompt` as ids, the transcript's text as text (see `xgen.generate.chat.prompt_ids`)."""
    from xgen.generate.chat import prompt_ids as chat_prompt_ids

    return chat_prompt_ids(template, _messages(dialogue, instruction), tokenizer)


@dataclass
class Prompt:
    item: Dialogue
    ids: list[int]
    dropped: int  # transcript tokens cut to fit


def fit_prompt(tokenizer, template, item: Dialogue, max_tokens: int, side: str) -> Prompt:
    """The prompt's ids, at most `max_tokens`: the transcript is cut at token level on `side`
    and the prompt re-rendered and re-encoded (a cut can merge tokens; the loop absorbs that)."""
    ids = prompt_ids(tokenizer, template, item.dialogue)
    if len(ids) <= max_tokens:
        return Prompt(item, ids, 0)
    dialogue_ids = tokenizer.encode_ordinary(item.dialogue)
    keep = len(dialogue_ids) - (len(ids) - max_tokens)
    while keep > 0:
        ids = prompt_ids(tokenizer, template, tokenizer.decode(truncate_tokens(dialogue_ids, keep, side)))
        if len(ids) <= max_tokens:
            return Prompt(item, ids, len(dialogue_ids) - keep)
        keep -= len(ids) - max_tokens
    raise ConfigError(f"{WHAT}: a prompt of at most {max_tokens} tokens has no room for the transcript (eval.max_input_tokens)")


# ---- scoring ----------------------------------------------------------------------------


def rouge_scorer():
    """rouge-score's scorer for R-1/R-2/R-L with the Porter stemmer (the common setting)."""
    try:
        from rouge_score import rouge_scorer as rs
    except ImportError:
        raise ConfigError(f"{WHAT}: ROUGE needs the rouge-score package: install xgen[eval]") from None
    return rs.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(scorer, reference: str, prediction: str) -> dict[str, float]:
    """F-measure (0..1) of each ROUGE type."""
    scores = scorer.score(reference, prediction)
    return {t: scores[t].fmeasure for t in ROUGE_TYPES}


# ---- generation -------------------------------------------------------------------------


def generate_summaries(engine, prompts: Sequence[Prompt], base, batch_size: int, store, progress=None) -> None:
    """Greedy (or sampled) summaries of the prompts not yet in `store`, longest first,
    `batch_size` per engine call; each goes to `store` under `<task>/<id>` as its batch ends.
    Per-row seeds (from the item's key) make samples independent of batching."""

    todo = sorted((p for p in prompts if f"{p.item.task}/{p.item.id}" not in store), key=lambda p: -len(p.ids))
    for batch in batched(todo, max(1, batch_size)):
        keys = [f"{p.item.task}/{p.item.id}" for p in batch]
        settings = [dataclasses.replace(base, seed=(base.seed + zlib.crc32(k.encode())) % 2**32) for k in keys]
        for key, p, c in zip(keys, batch, engine.generate([p.ids for p in batch], settings)):
            store.add(key, {"summary": c.text.strip(), "finish_reason": c.finish_reason,
                            "prompt_tokens": len(p.ids), "dropped_tokens": p.dropped})  # fmt: skip
        if progress is not None:
            progress.advance(len(batch))


def aggregate(items: dict[str, list[Dialogue]], store, scorer) -> tuple[dict, list[dict]]:
    """Per-task mean ROUGE F-measures and truncation counts, and one output row per item."""
    per_task, outputs = {}, []
    for task, dialogues in items.items():
        rows = []
        for d in dialogues:
            done = store.get(f"{task}/{d.id}")
            rows.append({"task": task, "id": d.id, **rouge(scorer, d.summary, done["summary"]), **done, "reference": d.summary})
        n = len(rows)
        per_task[task] = {
            "items": n,
            **{t: sum(r[t] for r in rows) / n if n else 0.0 for t in ROUGE_TYPES},
            "truncated": sum(r["dropped_tokens"] > 0 for r in rows),
            "dropped_tokens": sum(r["dropped_tokens"] for r in rows),
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / n if n else 0.0,
        }
        outputs += rows
    return per_task, outputs


def markdown_table(result: dict, model: str) -> str:
    """Table 13's layout (ROUGE x 100: a column group R-1/R-2/R-L per dataset), then what
    truncation did to each dataset's inputs (rows carry the model, so runs merge)."""

    tasks = result["tasks"]
    head, cells = ["Model"], [model]
    for task, r in tasks.items():
        title = TASKS.get(task, task)
        head += [f"{title} R-1", f"{title} R-2", f"{title} R-L"]
        cells += [f"{100 * r[t]:.2f}" for t in ROUGE_TYPES]
    limit = f"{result['max_input_tokens']} ({result['truncation']})"
    trunc = [["Model", "Dataset", "Dialogues", "Truncated inputs", "Tokens dropped", "Mean prompt tokens", "Input limit (cut side)"]]
    trunc += [[model, TASKS.get(t, t), str(r["items"]), str(r["truncated"]), str(r["dropped_tokens"]),
               f"{r['mean_prompt_tokens']:.0f}", limit] for t, r in tasks.items()]  # fmt: skip
    return markdown([head, cells]) + "\n" + markdown(trunc)


# ---- the run ----------------------------------------------------------------------------


def run_benchmark(cfg, run_dir: Path) -> dict:
    """`task=eval eval=summarization`: summarization.json/.md and the generated summaries in
    summarization_outputs.jsonl, resumable per (task, id)."""
    from xgen.generate.chat import stop_strings
    from xgen.generate.engine import SamplingConfig
    from xgen.generate.load import load_engine

    ev = cfg.eval
    check_truncation(ev.truncation)  # before the model loads
    scorer = rouge_scorer()  # before the model: a missing package fails fast
    items = {task: read_task(ev.data_path, task, ev.limit) for task in (ev.tasks or list(TASKS))}
    model = model_identity(cfg.checkpoint)
    engine = load_engine(cfg)
    budget = input_budget(engine.max_len, ev.max_new_tokens, ev.max_input_tokens)
    prompts = [fit_prompt(engine.tokenizer, cfg.chat_template, d, budget, ev.truncation) for ds in items.values() for d in ds]
    base = SamplingConfig(
        max_new_tokens=ev.max_new_tokens,
        temperature=ev.temperature,
        top_p=ev.top_p,
        stop=tuple(stop_strings(cfg.chat_template)) + tuple(ev.stop),
        seed=cfg.generate.seed,
    )
    settings = {"max_input_tokens": budget, "truncation": ev.truncation, "instruction": INSTRUCTION,
                "sampling": dataclasses.asdict(base), "chat_template": dataclasses.asdict(cfg.chat_template),
                **score_settings(cfg)}  # fmt: skip
    store = ItemStore(run_dir / f"{ev.name}_partial.jsonl", settings, model=model, data=data_fingerprint(ev.data_path))
    progress = Progress(WHAT, sum(f"{p.item.task}/{p.item.id}" not in store for p in prompts))
    generate_summaries(engine, prompts, base, ev.batch_size, store, progress)
    per_task, outputs = aggregate(items, store, scorer)
    with open(run_dir / f"{ev.name}_outputs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in outputs)
    result = {
        "max_input_tokens": budget,
        "truncation": ev.truncation,
        "max_new_tokens": ev.max_new_tokens,
        "temperature": ev.temperature,
        "instruction": INSTRUCTION,
        "tasks": per_task,
        "identity": store.identity,
    }
    return write_result(run_dir, cfg, result, markdown_table(result, model_label(cfg)))
