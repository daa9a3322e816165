"""MMLU exactly as Hendrycks et al.'s evaluate.py runs it, so numbers compare with Table 4/5.

The prompt is the original's, character for character: `format_subject`'s leading space
(two spaces after "about"), and each cell as pandas reads it ("None" prints "nan"); the k shots are the subject's first k dev rows, dropped one at a time while the prompt
does not fit; the prediction is the letter among " A".." D" with the highest next-token
log-probability. Accuracy is reported per subject, per category (the MMLU repo's
categories.py) and as the average over all questions, each weighing one.

The model is behind `predict(items) -> letters`, so aggregation is testable without one.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from xgen.config import ConfigError
from xgen.eval.common import (
    ItemStore,
    Progress,
    data_fingerprint,
    markdown,
    model_identity,
    model_label,
    score_settings,
    write_result,
)

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")

# MMLU repo's categories.py: subject -> subcategory, subcategory -> category.
SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}  # fmt: skip
CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
}
# Table 4's column order and headings.
TABLE_COLUMNS = (
    ("humanities", "Humanities"),
    ("STEM", "STEM"),
    ("social sciences", "Social Sciences"),
    ("other (business, health, misc.)", "Other"),
)


def category_of(subject: str) -> str | None:
    sub = SUBCATEGORIES.get(subject)
    return next((c for c, subs in CATEGORIES.items() if sub in subs), None)


# ---- data and prompts -------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


@dataclass
class Item:
    """One test question ready for the model: its prompt's text and tokens, and the truth."""

    subject: str
    prompt: str
    ids: list[int]
    answer: str
    shots: int  # examples that fitted


# pandas' default NA strings (`pandas._libs.parsers.STR_NA_VALUES`).
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})  # fmt: skip
_INT = re.compile(r"\s*[+-]?\d+\s*")
_FLOAT = re.compile(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|infinity|nan)\s*", re.IGNORECASE)


def _int64(v: str) -> bool:
    return -(2**63) <= int(v) < 2**63


def as_pandas_text(column: Sequence[str]) -> list[str]:
    """What `"{}".format(df.iloc[i, j])` gives for each cell of one column, as the original's
    `pd.read_csv(path, header=None)` types it: NA strings ("None", "NA", "") read as NaN and
    print "nan"; a column of integers is int64 ("007" -> "7"); integers beside an NA, or beside
    numbers with a fraction or an exponent, are float64 ("2" -> "2.0", "1e3" -> "1000.0");
    any other column is text as written. Checked against pandas in tests/eval/test_mmlu.py."""
    present = [v for v in column if v not in PANDAS_NA]
    integers = all(_INT.fullmatch(v) for v in present)
    if present and integers and len(present) == len(column) and all(_int64(v) for v in present):
        return [str(int(v)) for v in present]
    if all(_FLOAT.fullmatch(v) for v in present) and all(_int64(v) for v in present if _INT.fullmatch(v)):
        # Integers with an NA are read as int64, then cast; other numbers parse as floats.
        return ["nan" if v in PANDAS_NA else repr(float(int(v) if integers else v.strip())) for v in column]
    return ["nan" if v in PANDAS_NA else v for v in column]


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as ex:
        row = data[: ex.start].count(b"\n") + 1
        raise ConfigError(f"MMLU: {path} line {row} is not UTF-8 (byte 0x{data[ex.start]:02x} at offset {ex.start})") from None


def read_split(data_path: str | Path, split: str, subject: str) -> list[Question]:
    """One subject's split as the original reads it (pandas, no header): each choice column
    typed as pandas types it (`as_pandas_text`), so the prompts are the original's even for
    choices like "None" or "2" beside "2.5". Anything the original would crash on or misread
    (a row without six fields, an empty question, an answer that is not A-D) is one line."""
    path = Path(data_path) / split / f"{subject}_{split}.csv"
    if not path.is_file():
        raise ConfigError(f"MMLU: {subject}'s {split} split not found: expected {path} (eval.data_path={data_path})")
    try:
        rows = [r for r in csv.reader(io.StringIO(_decode(path), newline="")) if r]
    except csv.Error as ex:
        raise ConfigError(f"MMLU: {path}: not a CSV file ({ex})") from None
    for i, r in enumerate(rows):
        if len(r) != 6:
            raise ConfigError(f"MMLU: {path} row {i + 1} has {len(r)} fields, not question,A,B,C,D,answer")
        if r[0] in PANDAS_NA:
            raise ConfigError(f"MMLU: {path} row {i + 1} has no question ({r[0]!r} reads as NaN)")
        if r[5] not in LETTERS:
            raise ConfigError(f"MMLU: {path} row {i + 1}: answer {r[5]!r} is not one of A, B, C, D")
    choices = list(zip(*(as_pandas_text([r[j] for r in rows]) for j in range(1, 5))))
    return [Question(r[0], tuple(c), r[5]) for r, c in zip(rows, choices)]


def subjects_in(data_path: str | Path) -> list[str]:
    """Every subject with a test file, sorted (the original's order)."""
    test = Path(data_path) / "test"
    if not test.is_dir():
        raise ConfigError(f"MMLU: no test/ directory: expected {test} holding <subject>_test.csv (eval.data_path)")
    subjects = sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))
    if not subjects:
        raise ConfigError(f"MMLU: no <subject>_test.csv files in {test}")
    return subjects


def format_subject(subject: str) -> str:
    """The original's: every word prefixed by a space, so that the header, which adds its
    own space before it, reads "about  abstract algebra." with two."""
    return "".join(" " + word for word in subject.split("_"))


def format_example(q: Question, include_answer: bool = True) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += "\nAnswer:"
    return text + (f" {q.answer}\n\n" if include_answer else "")


def gen_prompt(dev: Sequence[Question], subject: str, k: int) -> str:
    header = "The following are multiple choice questions (with answers) about {}.\n\n".format(format_subject(subject))
    return header + "".join(format_example(q) for q in dev[:k])


def build_item(tokenizer, max_tokens: int, subject: str, dev: Sequence[Question], q: Question, k: int) -> Item:
    """The k-shot prompt, with k lowered while it exceeds `max_tokens` (the original's loop);
    if even zero shots do not fit, the prompt keeps its last `max_tokens` tokens."""
    end = format_example(q, include_answer=False)
    k = min(k, len(dev))
    while True:
        prompt = gen_prompt(dev, subject, k) + end
        ids = tokenizer.encode(prompt)
        if len(ids) <= max_tokens or k == 0:
            break
        k -= 1
    return Item(subject, prompt, ids[-max_tokens:], q.answer, k)


# ---- prediction -------------------------------------------------------------------------

Predictor = Callable[[Sequence[Item]], list[str]]


class EnginePredictor:
    """Reads the four letters' next-token log-probs at each prompt's last position: one
    sequence per question, `batch_size` questions per forward pass."""

    def __init__(self, engine, batch_size: int = 8):
        self.engine, self.batch_size = engine, max(1, batch_size)
        self.letter_ids = []
        for letter in LETTERS:
            ids = engine.tokenizer.encode(" " + letter)
            assert len(ids) == 1, f"' {letter}' is {len(ids)} tokens in this tokenizer, not one"
            self.letter_ids.append(ids[0])

    def letter_logprobs(self, items: Sequence[Item]) -> list[list[float]]:
        """log P(" A".." D" | prompt) for each item."""
        out: list[list[float]] = []
        for i in range(0, len(items), self.batch_size):
            chunk = [it.ids for it in items[i : i + self.batch_size]]
            out += self.engine.next_token_logprobs(chunk, self.letter_ids).tolist()
        return out

    def __call__(self, items: Sequence[Item]) -> list[str]:
        return [LETTERS[max(range(4), key=lp.__getitem__)] for lp in self.letter_logprobs(items)]


# ---- the run ----------------------------------------------------------------------------


def summarize(per_subject: dict[str, dict]) -> dict:
    """Per-category and overall accuracy, each question weighing one."""
    totals: dict[str, list[int]] = {c: [0, 0] for c in CATEGORIES}
    for subject, r in per_subject.items():
        cat = category_of(subject)
        if cat is not None:
            totals[cat][0] += r["correct"]
            totals[cat][1] += r["questions"]
    correct = sum(r["correct"] for r in per_subject.values())
    questions = sum(r["questions"] for r in per_subject.values())
    return {
        "categories": {c: {"correct": k, "questions": n, "accuracy": k / n} for c, (k, n) in totals.items() if n},
        "correct": correct,
        "questions": questions,
        "average": correct / questions if questions else 0.0,
    }


def read_subjects(
    data_path: str | Path, subjects: Sequence[str], shots: int, max_questions: int | None = None, allow_empty: bool = False
) -> dict[str, tuple[list[Question], list[Question]]]:
    """Every subject's (dev, test) split, read and checked before any model loads. A test
    split without questions, or a dev split with fewer rows than `shots` (which would make
    5-shot quietly fewer-shot), is an error unless `allow_empty` (the subject is then skipped,
    or runs with the shots it has, and the result says so)."""
    splits = {}
    for s in subjects:
        dev = read_split(data_path, "dev", s) if shots > 0 else []
        test = read_split(data_path, "test", s)[:max_questions]
        where = Path(data_path)
        if not test and not allow_empty:
            raise ConfigError(f"MMLU: {where / 'test' / f'{s}_test.csv'} has no questions (eval.allow_empty=true skips the subject)")
        if len(dev) < shots and not allow_empty:
            raise ConfigError(
                f"MMLU: {where / 'dev' / f'{s}_dev.csv'} has {len(dev)} rows, fewer than eval.shots={shots} "
                "(eval.allow_empty=true runs it with fewer shots)"
            )
        splits[s] = (dev, test)
    return splits


def read_all(ev) -> tuple[list[str], dict[str, tuple[list[Question], list[Question]]]]:
    """Every subject under `eval.data_path` (an `EvalConfig`) and its splits, read and checked:
    what `task=eval` and the training loop's benchmarks (`xgen.eval.inloop`) score."""
    subjects = subjects_in(ev.data_path)
    return subjects, read_subjects(ev.data_path, subjects, ev.shots, ev.limit, ev.allow_empty)


def evaluate(
    data_path: str | Path,
    tokenizer,
    max_tokens: int,
    predict: Predictor,
    *,
    shots: int = 5,
    max_questions: int | None = None,
    chunk: int = 8,
    partial_path: Path | None = None,
    subjects: Sequence[str] | None = None,
    splits: dict[str, tuple[list[Question], list[Question]]] | None = None,
    model: dict | None = None,
    settings: dict | None = None,
) -> dict:
    """Run every subject under `data_path` (or the `splits` already read); `max_tokens`
    bounds a prompt (the engine's max_len: the letters are read at the prompt's last
    position). Finished subjects go to `partial_path` as they complete, keyed by `model`
    (`load.model_identity`), the data's fingerprint and the settings, and are reused only
    when all three match."""
    subjects = list(subjects or subjects_in(data_path))
    splits = splits if splits is not None else read_subjects(data_path, subjects, shots, max_questions)
    key = {"shots": shots, "max_questions": max_questions, "max_tokens": max_tokens, **(settings or {})}
    store = ItemStore(partial_path, key, model=model, data=data_fingerprint(data_path))
    skipped = [s for s in subjects if not splits[s][1]]
    for s in skipped:
        log.warning("MMLU: %s has no test questions; skipped (eval.allow_empty)", s)
    subjects = [s for s in subjects if s not in skipped]
    per_subject = {s: store.get(s) for s in subjects if s in store}
    todo = {s: splits[s] for s in subjects if s not in per_subject}
    progress = Progress("mmlu questions", sum(len(t) for _, t in todo.values()))
    for subject, (dev, test) in todo.items():
        items = [build_item(tokenizer, max_tokens, subject, dev, q, shots) for q in test]
        predicted = []
        for i in range(0, len(items), chunk):
            predicted += predict(items[i : i + chunk])
            progress.advance(len(items[i : i + chunk]), subject)
        correct = sum(p == it.answer for p, it in zip(predicted, items))
        per_subject[subject] = {
            "subject": subject,
            "category": category_of(subject),
            "correct": correct,
            "questions": len(items),
            "accuracy": correct / len(items) if items else 0.0,
            "min_shots": min((it.shots for it in items), default=shots),
        }
        store.add(subject, per_subject[subject])
    per_subject = {s: per_subject[s] for s in subjects}
    result = {"shots": shots, "max_questions": max_questions, "subjects": per_subject, **summarize(per_subject)}
    return {**result, **({"skipped_empty": skipped} if skipped else {}), "identity": store.identity}


def markdown_table(result: dict, model: str = "model") -> str:
    """Laid out like the report's Table 4 (accuracy in %)."""
    cats = result["categories"]
    cells = [f"{100 * cats[c]['accuracy']:.1f}" if c in cats else "-" for c, _ in TABLE_COLUMNS]
    head = ["Models", *(title for _, title in TABLE_COLUMNS), "Weighted average"]
    rows = [head, [model, *cells, f"{100 * result['average']:.1f}"]]
    return markdown(rows)


def run_benchmark(cfg, run_dir: Path) -> dict:
    """`task=eval eval=mmlu_5shot|mmlu_0shot`: mmlu_*.json/.md in `run_dir`, resumable."""
    from xgen.generate.load import load_engine

    # Every file read and checked before the model loads: bad data fails in seconds.
    subjects, splits = read_all(cfg.eval)
    model = model_identity(cfg.checkpoint) if cfg.checkpoint else None
    engine = load_engine(cfg)
    result = evaluate(
        cfg.eval.data_path,
        engine.tokenizer,
        engine.max_len,
        EnginePredictor(engine, cfg.eval.batch_size),
        shots=cfg.eval.shots,
        max_questions=cfg.eval.limit,
        chunk=cfg.eval.batch_size,
        partial_path=run_dir / f"{cfg.eval.name}_partial.jsonl",
        subjects=subjects,
        splits=splits,
        model=model,
        settings=score_settings(cfg),
    )
    result = write_result(run_dir, cfg, result, markdown_table(result, model_label(cfg)))
    log.info("MMLU %d-shot: %.4f over %d questions; written to %s", cfg.eval.shots, result["average"], result["questions"], run_dir)
    return result
