"""Judged benchmarks of the instruction model: a judge model grades what it answers.

- `eval=longform_qa` (the report's Tables 11 and 12): questions about long documents;
  coherence, relevance and accuracy 0-3, overall and by document length.
- `eval=mt_bench` (Tables 9 and 10): FastChat's 80 two-turn questions, each turn graded 1-10;
  per-turn and per-category averages.
- `eval=alpaca_eval` (Table 8): AlpacaEval's instructions; the answer is compared with a
  reference model's (text-davinci-003 in alpaca_eval.json) in both orders; win rate (a tie
  counts half) with its standard error.

The model answers through the chat template (`render_prompt`), in batches; an input longer
than `eval.max_input_tokens` (default: what the context leaves after max_new_tokens) is cut
on the `eval.truncation` side and counted. The judge is `eval.judge` (xgen.eval.judge), with
verdicts cached on disk. Answers and verdicts are kept per item in the run directory, so a
rerun neither regenerates nor re-asks; `<name>_answers.jsonl` holds every answer and verdict
(alpaca_eval's and FastChat's answer fields, so those tools can read it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xgen.config import ConfigError
from xgen.eval import judge_prompts as jp
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
    require_file,
    score_settings,
    truncate_tokens,
    write_result,
)

log = logging.getLogger(__name__)

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# Table 12: document length in tokens (upper bounds).
LENGTH_BUCKETS = ((1024, "<=1K"), (2048, "1K-2K"), (4096, "2K-4K"), (8192, "4K-8K"), (math.inf, ">8K"))
JUDGE_CHUNK = 32  # items judged between two saves


def longform_question(document: str, question: str) -> str:
    """What the model is asked about a document (its user turn)."""
    return f"Read the document below and answer the question that follows it.\n\nDocument:\n{document}\n\nQuestion: {question}"


# ---- data (read and checked before a model loads) ---------------------------------------


def _text(row: dict, key: str, path: str, n: int) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: record {n} has no text field {key!r}")
    return value


def _unique(items: list[dict], path: str) -> list[dict]:
    seen = set()
    for it in items:
        if it["id"] in seen:
            raise ConfigError(f"{path}: id {it['id']!r} appears twice")
        seen.add(it["id"])
    return items


def read_longform(path: str) -> list[dict]:
    """JSON Lines of {id, document, question, answer?} (answer: a reference the judge sees)."""
    rows = read_records(path, "longform_qa")
    items = [
        {"id": str(r.get("id", n)), "document": _text(r, "document", path, n), "question": _text(r, "question", path, n),
         "reference": r.get("answer") if isinstance(r.get("answer"), str) else None}
        for n, r in enumerate(rows, 1)
    ]  # fmt: skip
    return _unique(items, path)


def read_mt_bench(path: str) -> list[dict]:
    """FastChat's question.jsonl: {question_id, category, turns: [first, second]}."""
    items = []
    for n, r in enumerate(read_records(path, "mt_bench"), 1):
        turns = r.get("turns")
        if "question_id" not in r or not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, str) for t in turns):
            raise ConfigError(f"{path}: record {n} is not {{question_id, category, turns: [first, second]}}")
        items.append({"id": str(r["question_id"]), "question_id": r["question_id"], "category": str(r.get("category", "")),
                      "turns": turns})  # fmt: skip
    return _unique(items, path)


def read_mt_bench_references(path: str) -> dict[str, list[str]]:
    """FastChat's reference_answer/gpt-4.jsonl: question_id -> the reference's turns."""
    refs = {}
    for n, r in enumerate(read_records(path, "mt_bench references"), 1):
        try:
            refs[str(r["question_id"])] = [str(t) for t in r["choices"][0]["turns"]]
        except (KeyError, IndexError, TypeError):
            raise ConfigError(f"{path}: record {n} is not {{question_id, choices: [{{turns: [...]}}]}}") from None
    return refs


def read_alpaca(path: str, reference_path: str | None) -> list[dict]:
    """alpaca_eval.json (a list of {instruction, output, generator, dataset}); the reference
    answer of an instruction is `output` in `reference_path` (the same layout), else the data
    file's own `output` (text-davinci-003's in the published file)."""
    rows = read_records(path, "alpaca_eval")
    ref_rows = read_records(require_file(reference_path, "alpaca_eval references", "eval.reference_path"),
                            "alpaca_eval references") if reference_path else rows  # fmt: skip
    refs = {}
    for n, r in enumerate(ref_rows, 1):
        refs[_text(r, "instruction", reference_path or path, n)] = (_text(r, "output", reference_path or path, n),
                                                                     str(r.get("generator", "reference")))  # fmt: skip
    items = []
    for n, r in enumerate(rows, 1):
        instruction = _text(r, "instruction", path, n)
        if instruction not in refs:
            raise ConfigError(f"{reference_path}: no reference output for record {n} of {path} ({instruction[:60]!r})")
        output, generator = refs[instruction]
        items.append({"id": str(n - 1), "instruction": instruction, "dataset": r.get("dataset", ""),
                      "reference": output, "reference_generator": generator})  # fmt: skip
    return items


# ---- answering ---------------------------------------------------------------------------


@dataclass
class Prompt:
    """A conversation for the model whose `text` (one message's content, or part of it) is
    what truncation may shorten: `render(text)` gives the messages with it in place."""

    render: Callable[[str], list[dict]]
    text: str
    seed: int


class Answerer:
    """Batched greedy (or sampled) answers of the chat model, inputs fitted to `budget` tokens."""

    def __init__(self, engine, cfg):
        from xgen.generate.chat import stop_strings
        from xgen.generate.engine import SamplingConfig

        ev = cfg.eval
        check_truncation(ev.truncation)  # before the model loads
        self.engine, self.template = engine, cfg.chat_template
        self.budget = input_budget(engine.max_len, cfg.eval.max_new_tokens, cfg.eval.max_input_tokens)
        self.side = ev.truncation
        stop = tuple(dict.fromkeys([*stop_strings(cfg.chat_template), *ev.stop]))
        self.settings = SamplingConfig(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                                         top_p=ev.top_p, stop=stop)  # fmt: skip

    def ids(self, prompt: Prompt, text: str) -> list[int]:
        from xgen.generate.chat import prompt_ids

        return prompt_ids(self.template, prompt.render(text), self.engine.tokenizer)

    def fit(self, prompt: Prompt) -> tuple[list[int], bool]:
        """The prompt's ids within the budget, and whether its text had to be cut."""
        ids = self.ids(prompt, prompt.text)
        if len(ids) <= self.budget:
            return ids, False
        tok = self.engine.tokenizer
        text_ids = tok.encode_ordinary(prompt.text)
        keep = self.budget - len(self.ids(prompt, ""))
        while True:
            if keep <= 0:
                raise ConfigError(f"eval.max_input_tokens: {self.budget} tokens do not hold this benchmark's prompt "
                                  "even without its document or question")  # fmt: skip
            ids = self.ids(prompt, tok.decode(truncate_tokens(text_ids, keep, self.side)))
            if len(ids) <= self.budget:
                return ids, True
            keep -= len(ids) - self.budget  # the cut's edges re-tokenized differently

    def answer(self, prompts: list[Prompt]) -> list[tuple[str, bool]]:
        """(answer text, whether the input was truncated) per prompt, one batch."""
        fitted = [self.fit(p) for p in prompts]
        settings = [dataclasses.replace(self.settings, seed=p.seed) for p in prompts]
        completions = self.engine.generate([ids for ids, _ in fitted], settings)
        return [(c.text.strip(), cut) for c, (_, cut) in zip(completions, fitted)]


def _seed(cfg, item_id: str, turn: int = 0) -> int:
    """Per item, so a sampled answer does not depend on batching or resuming."""
    return (cfg.seed * 1_000_003 + zlib.crc32(f"{item_id}/{turn}".encode())) % 2**31


def answer_items(kind: str, answerer: Answerer, cfg, items: list[dict]) -> list[dict]:
    """Answers of one batch: {"answers": [...], "truncated": bool} per item."""
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    if kind == "longform_qa":
        prompts = [Prompt(lambda d, it=it: user(longform_question(d, it["question"])), it["document"], _seed(cfg, it["id"]))
                   for it in items]  # fmt: skip
        tokens = [len(answerer.engine.tokenizer.encode(it["document"])) for it in items]
        return [{"answers": [a], "truncated": cut, "document_tokens": n} for (a, cut), n in zip(answerer.answer(prompts), tokens)]
    if kind == "alpaca_eval":
        prompts = [Prompt(user, it["instruction"], _seed(cfg, it["id"])) for it in items]
        return [{"answers": [a], "truncated": cut} for a, cut in answerer.answer(prompts)]
    first = answerer.answer([Prompt(user, it["turns"][0], _seed(cfg, it["id"], 1)) for it in items])
    second = answerer.answer([
        Prompt(lambda a1, it=it: [*user(it["turns"][0]), {"role": "assistant", "content": a1}, *user(it["turns"][1])],
               a1, _seed(cfg, it["id"], 2))
        for it, (a1, _) in zip(items, first)
    ])  # fmt: skip
    return [{"answers": [a1, a2], "truncated": c1 or c2} for (a1, c1), (a2, c2) in zip(first, second)]


# ---- judging -----------------------------------------------------------------------------


def judge_requests(kind: str, item: dict, answers: list[str], mt_refs: dict[str, list[str]] | None) -> list[list[dict]]:
    """The judge's requests for one answered item."""
    if kind == "longform_qa":
        return [jp.longform_messages(item["document"], item["question"], answers[0], item["reference"])]
    if kind == "alpaca_eval":
        a, ref = answers[0], item["reference"]
        return [jp.pair_messages(item["instruction"], a, ref), jp.pair_messages(item["instruction"], ref, a)]
    ref = (mt_refs or {}).get(item["id"]) if item["category"] in jp.REFERENCE_CATEGORIES else None
    return [jp.mt_bench_messages(item["turns"], answers, turn, ref) for turn in (1, 2)]


def read_verdicts(kind: str, verdicts: list[str]) -> dict:
    """Parsed verdicts of one item (None where unreadable)."""
    if kind == "longform_qa":
        return {"scores": jp.parse_longform(verdicts[0])}
    if kind == "mt_bench":
        return {"ratings": [jp.parse_rating(v) for v in verdicts]}
    model_first, model_second = jp.parse_pair(verdicts[0]), jp.parse_pair(verdicts[1])
    return {"model_first": model_first, "model_second": model_second, "score": pair_score(model_first, model_second)}


def pair_score(model_first: str | None, model_second: str | None) -> float | None:
    """The model's score on one instruction from both orders (win 1, tie 1/2, loss 0, the
    mean of the readable orders; None when neither is). In `model_first` the model is A."""
    scores = []
    if model_first is not None:
        scores.append({"A": 1.0, "tie": 0.5, "B": 0.0}[model_first])
    if model_second is not None:
        scores.append({"B": 1.0, "tie": 0.5, "A": 0.0}[model_second])
    return sum(scores) / len(scores) if scores else None


# ---- aggregation and tables --------------------------------------------------------------


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def length_bucket(tokens: int) -> str:
    return next(label for bound, label in LENGTH_BUCKETS if tokens <= bound)


def summarize_longform(records: list[dict]) -> dict:
    def scores_of(rs):
        parsed = [r["scores"] for r in rs if r["scores"] is not None]
        means = {a: _mean(s[a] for s in parsed) for a in jp.ASPECTS}
        return {"items": len(rs), "judged": len(parsed), **means,
                "average": _mean(means.values()) if parsed else None}  # fmt: skip

    buckets = [length_bucket(r["document_tokens"]) for r in records]
    by_length = {label: scores_of([r for r, b in zip(records, buckets) if b == label])
                 for _, label in LENGTH_BUCKETS if label in buckets}  # fmt: skip
    return {**scores_of(records), "unparseable": sum(r["scores"] is None for r in records),
            "truncated": sum(r["truncated"] for r in records), "by_length": by_length}  # fmt: skip


def summarize_mt_bench(records: list[dict]) -> dict:
    """FastChat's show_result: a turn's score is the mean over its readable ratings, the
    average and each category's the mean over every readable rating of both turns."""
    ratings = [(r["category"], t, x) for r in records for t, x in enumerate(r["ratings"], 1)]
    categories = {c: _mean(x for cat, _, x in ratings if cat == c) for c in dict.fromkeys(r["category"] for r in records)}
    return {"questions": len(records), "first_turn": _mean(x for _, t, x in ratings if t == 1),
            "second_turn": _mean(x for _, t, x in ratings if t == 2), "average": _mean(x for _, _, x in ratings),
            "categories": categories, "unparseable": sum(x is None for _, _, x in ratings),
            "truncated": sum(r["truncated"] for r in records)}  # fmt: skip


def win_rate(scores: list[float]) -> tuple[float, float]:
    """(win rate, standard error) in percent, as alpaca_eval's leaderboard: the mean of the
    per-instruction scores and its sample standard error (ddof 1)."""
    n = len(scores)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else float("nan")
    return 100 * mean, 100 * sd / math.sqrt(n)


def summarize_alpaca(records: list[dict]) -> dict:
    scores = [r["score"] for r in records if r["score"] is not None]
    rate, se = win_rate(scores)
    both = [r for r in records if r["model_first"] is not None and r["model_second"] is not None]
    agree = sum(pair_score(r["model_first"], None) == pair_score(None, r["model_second"]) for r in both)
    return {"win_rate": rate, "standard_error": se, "instructions": len(records), "judged": len(scores),
            "wins": sum(s > 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores),
            "losses": sum(s < 0.5 for s in scores),
            "unparseable": sum((r["model_first"] is None) + (r["model_second"] is None) for r in records),
            "position_agreement": agree / len(both) if both else None,
            "avg_length": _mean(len(r["answer"]) for r in records),
            "reference": records[0]["reference_generator"] if records else None,
            "truncated": sum(r["truncated"] for r in records)}  # fmt: skip


def _f(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(kind: str, s: dict, model: str, judge: str) -> str:
    """The report's layout (Tables 8, 9+10, 11+12), with the judge and what it could not read."""
    if kind == "longform_qa":
        head = ["Coherence", "Relevance", "Accuracy", "Average"]
        text = markdown([["Model", *head], [model, *(_f(s[k]) for k in (*jp.ASPECTS, "average"))]])
        text += "\n" + markdown([["Document length (tokens)", "Questions", *head]] + [
            [label, str(b["items"]), *(_f(b[k]) for k in (*jp.ASPECTS, "average"))] for label, b in s["by_length"].items()
        ])  # fmt: skip
        note = f"{s['judged']}/{s['items']} answers judged (0-3)"
    elif kind == "mt_bench":
        text = markdown([["Model", "First turn", "Second turn", "Average"],
                         [model, _f(s["first_turn"]), _f(s["second_turn"]), _f(s["average"])]])  # fmt: skip
        cats = [c for c in MT_BENCH_CATEGORIES if c in s["categories"]] + [c for c in s["categories"] if c not in MT_BENCH_CATEGORIES]
        text += "\n" + markdown([["Model", *(c.upper() if c == "stem" else c.capitalize() for c in cats)],
                                 [model, *(_f(s["categories"][c]) for c in cats)]])  # fmt: skip
        note = f"{s['questions']} questions, 2 turns each, rated 1-10"
    else:
        text = markdown([["Model", "Win rate (%)", "Std. error", "Wins", "Ties", "Losses", "Avg. length"],
                         [model, _f(s["win_rate"]), _f(s["standard_error"]), str(s["wins"]), str(s["ties"]),
                          str(s["losses"]), _f(s["avg_length"], 0)]])  # fmt: skip
        note = f"against {s['reference']}, both orders judged; {s['judged']}/{s['instructions']} instructions"
    return text + f"\nJudge: {judge}; {note}; unreadable verdicts: {s['unparseable']}; truncated inputs: {s['truncated']}\n"


SUMMARIZE = {"longform_qa": summarize_longform, "mt_bench": summarize_mt_bench, "alpaca_eval": summarize_alpaca}


# ---- the run -----------------------------------------------------------------------------


def read_items(cfg) -> tuple[list[dict], dict[str, list[str]] | None]:
    """The benchmark's items (first `eval.limit`) and MT-Bench's reference answers."""
    ev, refs = cfg.eval, None
    if ev.kind == "longform_qa":
        items = read_longform(ev.data_path)
    elif ev.kind == "mt_bench":
        items = read_mt_bench(ev.data_path)
        if ev.reference_path:
            refs = read_mt_bench_references(require_file(ev.reference_path, "mt_bench reference answers",
                                                         "eval.reference_path, or null to judge without"))  # fmt: skip
    elif ev.kind == "alpaca_eval":
        items = read_alpaca(ev.data_path, ev.reference_path)
    else:
        raise ConfigError(f"eval.kind={ev.kind!r} is not a judged benchmark ({', '.join(SUMMARIZE)})")
    return items[: ev.limit] if ev.limit is not None else items, refs


def answer_file_row(kind: str, item: dict, answered: dict, judged: dict, model: str) -> dict:
    """One line of `<name>_answers.jsonl`, in the public answer layouts."""
    if kind == "alpaca_eval":
        row = {"instruction": item["instruction"], "output": answered["answers"][0], "generator": model,
               "dataset": item["dataset"]}  # fmt: skip
    elif kind == "mt_bench":
        row = {"question_id": item["question_id"], "model_id": model, "category": item["category"],
               "choices": [{"index": 0, "turns": answered["answers"]}], "tstamp": answered["tstamp"]}  # fmt: skip
    else:
        row = {"id": item["id"], "question": item["question"], "answer": answered["answers"][0]}
    judgement = {k: v for k, v in judged.items() if k != "answers"}
    return {**row, "truncated": answered["truncated"], "judgement": judgement}


def answer_settings(cfg) -> dict:
    """What the answers depend on: a change regenerates them."""
    ev = cfg.eval
    return {"kind": ev.kind, "max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature, "top_p": ev.top_p,
            "stop": list(ev.stop), "max_input_tokens": ev.max_input_tokens, "truncation": ev.truncation,
            "generate_max_len": cfg.generate.max_len, "chat_template": dataclasses.asdict(cfg.chat_template),
            "seed": cfg.seed}  # fmt: skip


def generate_answers(cfg, items: list[dict], answers: ItemStore) -> None:
    """Answer the items `answers` does not hold yet (loading the model only if there are any)."""
    todo = [it for it in items if it["id"] not in answers]
    if not todo:
        return
    from xgen.generate.load import load_engine

    answerer = Answerer(load_engine(cfg), cfg)
    progress = Progress(f"{cfg.eval.name} answers", len(todo))
    for batch in batched(todo, max(1, cfg.eval.batch_size)):
        for it, answered in zip(batch, answer_items(cfg.eval.kind, answerer, cfg, batch)):
            answers.add(it["id"], {**answered, "tstamp": time.time()})
        progress.advance(len(batch))


def judge_answers(cfg, items: list[dict], answers: ItemStore, verdicts: ItemStore, mt_refs) -> None:
    """Judge the answered items `verdicts` does not hold for these very answers (an answer
    regenerated after its file was removed is judged again)."""
    from xgen.eval.judge import JudgeClient

    ev, kind = cfg.eval, cfg.eval.kind
    judge = JudgeClient(ev.judge)
    answers_of = lambda it: answers.get(it["id"])["answers"]  # noqa: E731
    todo = [it for it in items if it["id"] not in verdicts or verdicts.get(it["id"])["answers"] != answers_of(it)]
    progress = Progress(f"{ev.name} judgements", len(todo))
    for chunk in batched(todo, JUDGE_CHUNK):
        requests = [judge_requests(kind, it, answers_of(it), mt_refs) for it in chunk]
        flat = [(i, j, m) for i, reqs in enumerate(requests) for j, m in enumerate(reqs)]
        replies: list[list[str]] = [[""] * len(reqs) for reqs in requests]
        for n, reply in judge.complete_many([m for _, _, m in flat]):
            i, j, _ = flat[n]
            replies[i][j] = reply
        for it, texts in zip(chunk, replies):
            served = sorted(judge.served)  # who answered, as the endpoint names itself
            record = {"answers": answers_of(it), "verdicts": texts, "judge_served": served, **read_verdicts(kind, texts)}
            verdicts.add(it["id"], record)
        progress.advance(len(chunk))
    log.info("%s: judge %s: %d request(s) sent, %d from the cache", ev.name, judge.model, judge.sent, judge.cache_hits)


def item_record(kind: str, item: dict, answered: dict, judged: dict) -> dict:
    """What aggregation needs of one item."""
    record = {"id": item["id"], "truncated": answered["truncated"],
              **{k: v for k, v in judged.items() if k not in ("verdicts", "answers")}}  # fmt: skip
    if kind == "longform_qa":
        record["document_tokens"] = answered["document_tokens"]
    elif kind == "mt_bench":
        record["category"] = item["category"]
    else:
        record.update(answer=answered["answers"][0], reference_generator=item["reference_generator"])
    return record


def run_benchmark(cfg, run_dir: Path) -> dict:
    """`task=eval eval=longform_qa|mt_bench|alpaca_eval`: answer, judge, aggregate."""
    ev, kind = cfg.eval, cfg.eval.kind
    check_truncation(ev.truncation)  # before the model loads
    items, mt_refs = read_items(cfg)  # before the model: bad data and settings fail fast
    if not items:
        raise ConfigError(f"{ev.data_path}: no items")
    settings = {**answer_settings(cfg), **score_settings(cfg)}
    data = data_fingerprint(ev.data_path) + (f"+{data_fingerprint(ev.reference_path)}" if ev.reference_path else "")
    model_id = model_identity(cfg.checkpoint)
    answers = ItemStore(run_dir / f"{ev.name}_partial.jsonl", settings, model=model_id, data=data)
    generate_answers(cfg, items, answers)
    judge_settings = {**settings, "judge_model": ev.judge.model, "judge_temperature": ev.judge.temperature,
                      "judge_max_tokens": ev.judge.max_tokens, "references": mt_refs is not None}  # fmt: skip
    verdicts = ItemStore(run_dir / f"{ev.name}_judged_partial.jsonl", judge_settings, model=model_id, data=data)
    judge_answers(cfg, items, answers, verdicts, mt_refs)

    model = model_label(cfg)
    pairs = [(it, answers.get(it["id"]), verdicts.get(it["id"])) for it in items]
    records = [item_record(kind, it, a, v) for it, a, v in pairs]
    with open(run_dir / f"{ev.name}_answers.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(answer_file_row(kind, it, a, v, model), ensure_ascii=False) + "\n" for it, a, v in pairs)
    summary = SUMMARIZE[kind](records)
    served = sorted({name for _, _, v in pairs for name in v.get("judge_served", [])})
    judge_name = ", ".join(served) or ev.judge.model  # what answered, not only what was asked for
    result = {"judge": {"model": ev.judge.model, "served": served, "base_url": ev.judge.base_url}, **summary,
              "unparseable_ids": [r["id"] for r in records if _unreadable(kind, r)], "identity": answers.identity}  # fmt: skip
    return write_result(run_dir, cfg, result, table(kind, summary, model, judge_name))


def _unreadable(kind: str, record: dict) -> bool:
    if kind == "longform_qa":
        return record["scores"] is None
    if kind == "mt_bench":
        return any(r is None for r in record["ratings"])
    return record["model_first"] is None or record["model_second"] is None
