"""A small, learnable instruction set in every SFT format, with planted bad records.

    python -m xgen.sft.synthetic data/sft/synthetic

The content is a fixed table of made-up facts (`FACTS`: "What is the color of the zorblat?"
→ "The zorblat is teal."), asked and answered with the same words in every format, so that a
tiny model fine-tuned on these files can memorize the answers and an end-to-end test can ask
one. Each file also holds a few records that must be skipped and counted (`PLANTED`), and
the files cover every container the readers accept: a JSON array (alpaca, sharegpt, baize),
JSON Lines (dolly), gzipped JSON Lines (oasst, as OpenAssistant's trees export) and Parquet
(scrolls, as the Hugging Face dataset; JSON Lines when pyarrow is not installed). SCROLLS
records are long documents of the facts followed by a question: half are over 4,000 tokens
and half well under, so the report's `min_tokens: 4000` has something to drop.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

NAMES = (
    "zorblat quindle flumox brastik glimber yarvex plonkit trevasp mindral skorvel drubble fenwox hapsel jintor "
    "klavern lurbish morvek nibbet ospral pindor quaxel rostub sprindle tolvar umbrik vexlin wobrey xandril "
    "yompet zelbin ambrok blixet crundle dorvash elvip frazzik gondrel hulvar ixtrel jorbin"
).split()
_KINDS = (  # question, answer, ten values
    ("What is the color of the {n}?", "The {n} is {v}.",
     "teal crimson amber violet silver ochre indigo coral olive maroon"),
    ("Where does the {n} live?", "The {n} lives in the {v}.",
     "marshes caves treetops deserts glaciers canyons meadows reefs dunes hills"),
    ("What does the {n} eat?", "The {n} eats {v}.",
     "moss pebbles honey clover beetles seaweed acorns mushrooms berries snails"),
    ("How many legs does the {n} have?", "The {n} has {v} legs.",
     "two three four five six seven eight nine ten twelve"),
)  # fmt: skip
# (question, answer): name i gets question kind i % 4 and that kind's value i // 4.
FACTS: list[tuple[str, str]] = [
    (_KINDS[i % 4][0].format(n=n), _KINDS[i % 4][1].format(n=n, v=_KINDS[i % 4][2].split()[i // 4]))
    for i, n in enumerate(NAMES)
]
WRONG = "I am not sure about that."  # what lower-ranked and deleted oasst replies say
BAIZE_PREAMBLE = "The conversation between human and AI assistant.\n"
SCROLLS_LONG, SCROLLS_SHORT = 6, 6  # records over / well under 4,000 tokens
# Bad records in each file, by the reason `load_source` counts them under.
PLANTED: dict[str, dict[str, int]] = {
    "alpaca": {"malformed:output": 2, "malformed:instruction": 1, "malformed:record": 1},
    "sharegpt": {"malformed:roles": 2, "malformed:empty": 1, "malformed:conversations": 1, "malformed:value": 1},
    "oasst": {"malformed:json": 1, "malformed:prompt": 2, "malformed:empty": 1},
    "dolly": {"malformed:json": 1, "malformed:response": 1, "malformed:instruction": 1},
    "baize": {"malformed:empty": 1, "malformed:input": 1, "malformed:roles": 1},
    "scrolls": {"malformed:output": 1, "malformed:input": 1},
}


def _alpaca() -> list[Any]:
    records: list[Any] = [
        {"instruction": "Answer in one sentence.", "input": q, "output": a}  # the question as input
        if i % 8 == 7 else {"instruction": q, "input": "", "output": a}
        for i, (q, a) in enumerate(FACTS)
    ]  # fmt: skip
    return records + [
        {"instruction": FACTS[0][0], "input": ""},
        {"instruction": FACTS[1][0], "input": "", "output": "   "},
        {"instruction": 17, "input": "", "output": FACTS[2][1]},
        "not a record",
    ]


def _chunks(rng: np.random.Generator, sizes: tuple[int, ...]) -> list[list[tuple[str, str]]]:
    """All facts in a seeded order, cut into groups of the given sizes in turn."""
    order = [FACTS[i] for i in rng.permutation(len(FACTS))]
    groups, start = [], 0
    while start < len(order):
        size = sizes[len(groups) % len(sizes)]
        groups.append(order[start : start + size])
        start += size
    return groups


def _sharegpt(rng: np.random.Generator) -> list[Any]:
    records: list[Any] = []
    for k, group in enumerate(_chunks(rng, (2, 3, 1))):
        turns = [{"from": who, "value": text} for q, a in group for who, text in (("human", q), ("gpt", a))]
        if k % 4 == 1:
            turns.insert(0, {"from": "system", "value": "You answer questions about imaginary animals."})
        elif k % 4 == 2:
            turns.insert(0, {"from": "gpt", "value": "Hello! Ask me about animals."})  # dropped
        elif k % 4 == 3:
            turns.append({"from": "human", "value": "Thanks!"})  # dropped
        records.append({"id": f"synthetic_{k}", "conversations": turns})
    q, a = FACTS[0]
    return records + [
        {"id": "bad_roles", "conversations": [
            {"from": "human", "value": q}, {"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        {"id": "bad_speaker", "conversations": [{"from": "narrator", "value": q}, {"from": "gpt", "value": a}]},
        {"id": "bad_empty", "conversations": [{"from": "human", "value": q}]},
        {"id": "bad_missing"},
        {"id": "bad_value", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ""}]},
    ]


def _oasst_tree(k: int, group: list[tuple[str, str]]) -> dict:
    """A tree whose highest-ranked path asks and answers the group's facts in order; every
    other branch (lower rank, null rank, deleted, rejected in review) answers WRONG."""

    def reply(text: str, rank: int | None, replies: list | None = None, **extra: Any) -> dict:
        return {"text": text, "role": "assistant", "rank": rank, "replies": replies or [], **extra}

    def prompter(text: str, rank: int | None, replies: list) -> dict:
        return {"text": text, "role": "prompter", "rank": rank, "replies": replies}

    (q1, a1), rest = group[0], group[1:]
    best_children = [prompter(rest[0][0], None, [reply(rest[0][1], 0), reply(WRONG, 1)])] if rest else []
    if k % 3 == 2:  # the path ends on a prompter message: trimmed back to the last answer
        best_children = best_children or [prompter("Tell me more.", 0, [])]
    variants = [
        [reply(WRONG, 1), reply(a1, 0, best_children), reply(WRONG, 0, deleted=True)],
        [reply(WRONG, None), reply(a1, 2, best_children), reply(WRONG, 3)],  # null sorts last
        [reply(a1, 0, best_children), reply(WRONG, 0), reply(WRONG, -1, review_result=False)],  # tie: first
    ]
    return {
        "message_tree_id": f"tree-{k}",
        "tree_state": "ready_for_export",
        "prompt": {"text": q1, "role": "prompter", "lang": "en", "replies": variants[k % 3]},
    }


def _oasst(rng: np.random.Generator) -> list[Any]:
    trees = [_oasst_tree(k, group) for k, group in enumerate(_chunks(rng, (2, 1)))]
    q, a = FACTS[0]
    return trees + [
        {"message_tree_id": "bad-deleted", "prompt": {"text": q, "role": "prompter", "replies": [
            {"text": a, "role": "assistant", "rank": 0, "deleted": True, "replies": []}]}},
        {"message_tree_id": "bad-no-prompt"},
        {"message_tree_id": "bad-prompt-rejected", "prompt": {
            "text": q, "role": "prompter", "review_result": False, "replies": []}},
    ]  # fmt: skip


def _dolly() -> list[Any]:
    records: list[Any] = []
    for i, (q, a) in enumerate(FACTS):
        context = f"Field notes: {FACTS[(i + 1) % len(FACTS)][1]}" if i % 5 == 4 else ""
        category = "closed_qa" if context else "open_qa"
        records.append({"instruction": q, "context": context, "response": a, "category": category})
    return records + [
        {"instruction": FACTS[3][0], "context": "", "category": "open_qa"},
        {"instruction": "", "context": "", "response": FACTS[3][1], "category": "open_qa"},
    ]


def _baize(rng: np.random.Generator) -> list[Any]:
    records: list[Any] = []
    for group in _chunks(rng, (3, 2)):
        dialogue = "".join(f"[|Human|] {q}\n[|AI|] {a}\n" for q, a in group)
        records.append({"topic": group[0][0], "input": BAIZE_PREAMBLE + dialogue + "[|Human|] "})
    q, a = FACTS[0]
    return records + [
        {"topic": "no markers", "input": f"{q} {a}"},
        {"topic": "no input"},
        {"topic": "two humans", "input": f"{BAIZE_PREAMBLE}[|Human|] {q}\n[|Human|] {q}\n[|AI|] {a}\n"},
    ]


def _scrolls(rng: np.random.Generator) -> list[dict]:
    """Field guides of the facts (about 6 tokens a sentence), each followed by a question,
    as SCROLLS' QA tasks put question and document in one input."""
    records = []
    for k in range(SCROLLS_LONG + SCROLLS_SHORT):
        n_sentences = 800 if k % 2 == 0 else 120  # about 6,700 vs 1,000 tokens
        sentences = [FACTS[i][1] for i in rng.integers(0, len(FACTS), n_sentences)]
        paragraphs = [" ".join(sentences[i : i + 10]) for i in range(0, n_sentences, 10)]
        q, a = FACTS[int(rng.integers(len(FACTS)))]
        document = f"Field guide, volume {k + 1}.\n\n" + "\n\n".join(paragraphs)
        records.append({"id": f"guide-{k}", "pid": f"guide-{k}_0", "input": f"{q}\n\n{document}", "output": a})
    q, a = FACTS[0]
    return records + [
        {"id": "bad-output", "pid": "bad-output_0", "input": f"{q}\n\nField guide.", "output": ""},
        {"id": "bad-input", "pid": "bad-input_0", "input": None, "output": a},
    ]


def _write_jsonl(path: Path, records: list[Any], bad_line: bool = False) -> None:
    lines = [json.dumps(r) for r in records]
    if bad_line:
        lines.insert(len(lines) // 2, '{"instruction": "cut off in the mid')
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def write_fixtures(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write one file per format under `root` (created); returns {format: file}.

    Deterministic for a seed: the same bytes every time (gzip without a timestamp)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = {
        "alpaca": root / "alpaca.json",
        "sharegpt": root / "sharegpt.json",
        "oasst": root / "oasst.trees.jsonl.gz",
        "dolly": root / "dolly.jsonl",
        "baize": root / "baize.json",
    }
    files["alpaca"].write_text(json.dumps(_alpaca(), indent=1))
    files["sharegpt"].write_text(json.dumps(_sharegpt(rng), indent=1))
    _write_jsonl(files["oasst"], _oasst(rng), bad_line=True)
    _write_jsonl(files["dolly"], _dolly(), bad_line=True)
    files["baize"].write_text(json.dumps(_baize(rng), indent=1))
    scrolls = _scrolls(rng)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        files["scrolls"] = root / "scrolls.jsonl"
        _write_jsonl(files["scrolls"], scrolls)
    else:
        files["scrolls"] = root / "scrolls.parquet"
        pq.write_table(pa.Table.from_pylist(scrolls), files["scrolls"])
    for other in {root / "scrolls.jsonl", root / "scrolls.parquet"} - {files["scrolls"]}:
        other.unlink(missing_ok=True)  # `scrolls.*` in conf/sft/synthetic.yaml must match one file
    return files


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m xgen.sft.synthetic <output directory>", file=sys.stderr)
        return 2
    for fmt, path in write_fixtures(Path(argv[0])).items():
        print(f"{fmt:9s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
