"""Datasets in the file layouts their authors release: OpenAssistant's trees export against
the same messages as Hugging Face rows (parquet) and as the messages JSON Lines export, and
`sft=wizardlm` finding WizardLM's released files by their names."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError, SFTSourceConfig
from xgen.sft import Conversation, Turn, load_source
from xgen.sft.data import load_conversations
from xgen.tokenizer import Tokenizer

TOK = Tokenizer.xgen()


def conv(*texts: str, source: str = "oasst") -> Conversation:
    turns = tuple(Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts))
    return Conversation(turns, None, source)


# --- OpenAssistant --------------------------------------------------------------------------


def node(text: str, role: str, rank: int | None = None, replies: tuple = (), **extra: Any) -> dict:
    """A message as the trees export writes it (ids are filled in by `tree`)."""
    fields = {
        "user_id": "u", "created_date": "2023-02-05T14:23:50.983374+00:00", "text": text, "role": role,
        "lang": "en", "review_count": 3, "review_result": True, "deleted": False, "rank": rank,
        "synthetic": False, "model_name": None, "detoxify": {"toxicity": 0.01, "insult": 0.0},
        "emojis": {"+1": 2}, "labels": {"spam": {"value": 0.0, "count": 3}},
    }  # fmt: skip
    return {**fields, **extra, "replies": list(replies)}


def tree(tree_id: str, prompt: dict) -> dict:
    """A trees-export record, with message ids and parent ids set through the tree."""
    counter = iter(range(1000))

    def number(message: dict, parent: str | None) -> None:
        message["message_id"], message["parent_id"] = f"{tree_id}-m{next(counter)}", parent
        for r in message["replies"]:
            number(r, message["message_id"])

    number(prompt, None)
    return {"message_tree_id": tree_id, "tree_state": "ready_for_export", "prompt": prompt}


def a(text, rank=None, *replies, **extra):
    return node(text, "assistant", rank, replies, **extra)


def p(text, rank=None, *replies, **extra):
    return node(text, "prompter", rank, replies, **extra)


def deep(tree_id: str, depth: int) -> tuple[dict, list[str]]:
    """A chain of `depth` exchanges; at every level a higher-ranked sibling comes second."""
    texts = [f"{tree_id} turn {i}" for i in range(2 * depth)]
    replies: list[dict] = []
    for i in reversed(range(1, 2 * depth)):
        make = a if i % 2 else p
        replies = [make(f"{texts[i]} (worse)", 1), make(texts[i], 0, *replies)]
    return tree(tree_id, p(texts[0], None, *replies)), texts


def oasst_trees() -> tuple[list[dict], list[dict], list[Conversation]]:
    """(train trees, validation trees, the conversations they give), covering ranks and their
    ties, null ranks, deleted and review-rejected messages, and several levels."""
    t1 = tree("t1", p("Q1", None,
        a("deleted best", 0, deleted=True),
        a("rejected best", 0, review_result=False),
        a("A1", 1,
          p("Q2", 0, a("A2 worse", 1), a("A2", 0), a("A2 unranked", None)),
          p("Q2 tie", 0, a("never", 0))),  # a tie: the first reply wins
        a("A1 tie", 1, p("not followed", 0, a("never", 0))),
        a("unranked", None)))  # fmt: skip
    t2 = tree("t2", p("R1", None,
        a("first", None, p("dangling question", None)),  # null ranks only: the first; ends on a prompter
        a("second", None)))  # fmt: skip
    t3 = tree("t3", p("S1", None, a("gone", 0, deleted=True)))  # nothing to answer: malformed:empty
    t4 = tree("t4", p("rejected prompt", None, a("A", 0), review_result=False))  # malformed:prompt
    t5, chain = deep("t5", depth=3)
    t6 = tree("t6", p("V1", None, a("V1 worse", 1), a("V1 answer", 0), a("V1 deleted", 0, deleted=True)))
    expected = [conv("Q1", "A1", "Q2", "A2"), conv("R1", "first"), conv(*chain), conv("V1", "V1 answer")]
    return [t1, t2, t3, t4], [t5, t6], expected


def flatten(trees: list[dict]) -> list[dict]:
    """The Hugging Face rows of the trees: one per message, depth first (the export's order),
    each with its tree's id and state and without replies."""
    rows = []

    def visit(message: dict, record: dict) -> None:
        fields = {k: v for k, v in message.items() if k != "replies"}
        rows.append({**fields, "message_tree_id": record["message_tree_id"], "tree_state": record["tree_state"]})
        for r in message["replies"]:
            visit(r, record)

    for record in trees:
        visit(record["prompt"], record)
    return rows


def children_first(rows: list[dict]) -> list[dict]:
    """The rows deepest level first, each level in row order: replies before the message they
    answer, siblings and trees still in order."""
    depth = {}
    for row in rows:
        depth[row["message_id"]] = depth.get(row["parent_id"], -1) + 1  # an orphan: level 0
    return sorted(rows, key=lambda row: -depth[row["message_id"]])  # sorted is stable


ORPHAN = {"message_id": "lost", "parent_id": "not-in-any-file", "text": "orphan", "role": "assistant", "rank": 0}


def write_parquet(path: Path, rows: list[dict]) -> None:
    """Rows with the column types of `OpenAssistant/oasst1` (rank float64 with nulls)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("message_id", pa.string()), ("parent_id", pa.string()), ("user_id", pa.string()),
        ("created_date", pa.string()), ("text", pa.string()), ("role", pa.string()), ("lang", pa.string()),
        ("review_count", pa.int32()), ("review_result", pa.bool_()), ("deleted", pa.bool_()),
        ("rank", pa.float64()), ("synthetic", pa.bool_()), ("model_name", pa.string()),
        ("detoxify", pa.struct([("toxicity", pa.float64()), ("insult", pa.float64())])),
        ("message_tree_id", pa.string()), ("tree_state", pa.string()),
        ("emojis", pa.struct([("name", pa.list_(pa.string())), ("count", pa.list_(pa.int32()))])),
        ("labels", pa.struct([
            ("name", pa.list_(pa.string())), ("value", pa.list_(pa.float64())), ("count", pa.list_(pa.int32())),
        ])),
    ])  # fmt: skip

    def hf(row: dict) -> dict:  # emojis and labels as the dataset's struct-of-lists columns
        emojis, labels = row.get("emojis") or {}, row.get("labels") or {}
        return {
            **row,
            "emojis": {"name": list(emojis), "count": list(emojis.values())},
            "labels": {"name": list(labels), "value": [v["value"] for v in labels.values()],
                       "count": [v["count"] for v in labels.values()]},
        }  # fmt: skip

    table = pa.Table.from_pylist([hf(row) for row in rows], schema=schema)
    assert table.column("rank").null_count > 0 and table.schema.field("rank").type == pa.float64()
    pq.write_table(table, path)


def load(name: str, *paths: Path) -> tuple[list[Conversation], dict[str, int]]:
    return load_source(name, SFTSourceConfig(format="oasst", paths=[str(p) for p in paths]), TOK, seed=0)


@pytest.fixture(scope="module")
def oasst(tmp_path_factory) -> dict[str, Any]:
    """The trees export and the same messages in both flat layouts, with one orphan row."""
    root = tmp_path_factory.mktemp("sft")
    train, validation, expected = oasst_trees()
    trees = root / "2023-04-12_oasst_ready.trees.jsonl.gz"
    trees.write_bytes(gzip.compress("".join(json.dumps(t) + "\n" for t in train + validation).encode(), mtime=0))
    flat_train, flat_validation = flatten(train), flatten(validation) + [ORPHAN]
    # The messages export writes nulls or leaves them out (--exclude-nulls): both here.
    rows = children_first(flat_train + flat_validation)
    rows = [{k: v for k, v in r.items() if v is not None} if i % 2 else r for i, r in enumerate(rows)]
    prompts = [r for r in rows if r.get("parent_id") is None]
    assert {"parent_id" in r for r in prompts} == {True, False}  # prompts with a null and with none
    messages = root / "2023-04-12_oasst_ready.messages.jsonl.gz"
    messages.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0))
    return {"root": root, "trees": trees, "messages": messages, "expected": expected,
            "train": flat_train, "validation": flat_validation}  # fmt: skip


def test_oasst_trees_export_gives_the_highest_ranked_paths(oasst):
    convs, counts = load("oasst", oasst["trees"])
    assert convs == oasst["expected"]
    assert counts["records"] == 6 and counts["malformed:empty"] == 1 and counts["malformed:prompt"] == 1


@pytest.mark.parametrize("layout", ["parquet", "messages.jsonl.gz"])
def test_oasst_message_rows_give_the_same_conversations_as_the_trees_export(oasst, layout):
    if layout == "parquet":
        pytest.importorskip("pyarrow")
        data = oasst["root"] / "oasst1" / "data"
        data.mkdir(parents=True, exist_ok=True)
        write_parquet(data / "train-00000-of-00001-b42a775f407cee45.parquet", oasst["train"])
        write_parquet(data / "validation-00000-of-00001-134b8fd0c89408b6.parquet", oasst["validation"])
        paths = [data / "*.parquet"]  # both splits, one source: rows are linked across files
    else:
        paths = [oasst["messages"]]
    from_trees, tree_counts = load("oasst", oasst["trees"])
    convs, counts = load("oasst", *paths)
    assert convs == from_trees == oasst["expected"]
    n_messages = len(oasst["train"]) + len(oasst["validation"])
    assert counts == {
        "records": tree_counts["records"] + 1, "messages": n_messages,  # a record per tree, and the orphan
        "malformed": tree_counts["malformed"] + 1, "malformed:empty": 1, "malformed:parent": 1,
        "malformed:prompt": 1, "too_short": 0, "kept": 4, "sampled": 4,
    }  # fmt: skip


def test_oasst_rows_linked_across_files_and_cycles_are_counted(tmp_path):
    """A reply may sit in another file than its parent (one source is one message table);
    ids repeated, parent links in a cycle and messages under an orphan are counted, not lost."""
    rows = [
        {"message_id": "q", "parent_id": None, "text": "Q", "role": "prompter"},
        {"message_id": "x", "parent_id": "y", "text": "X", "role": "assistant"},
        {"message_id": "y", "parent_id": "x", "text": "Y", "role": "prompter"},
        {"message_id": "q", "parent_id": None, "text": "Q again", "role": "prompter"},
        {"message_id": "o", "parent_id": "gone", "text": "O", "role": "assistant"},
        {"message_id": "o2", "parent_id": "o", "text": "O2", "role": "prompter"},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reply = {"message_id": "r", "parent_id": "q", "text": "A", "role": "assistant", "rank": 0}
    (tmp_path / "b.jsonl").write_text(json.dumps(reply) + "\n")
    convs, counts = load("s", tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert convs == [conv("Q", "A", source="s")]
    assert counts["messages"] == 7 and counts["malformed:message_id"] == 1 and counts["malformed:parent"] == 3


def test_oasst_rows_of_only_orphans_are_one_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ORPHAN) + "\n")
    message = r"^sft\.sources\.s \(oasst\): no conversation kept \(records 1, messages 1, .*malformed:parent 1"
    with pytest.raises(ConfigError, match=message):
        load("s", tmp_path / "a.jsonl")


# --- WizardLM -------------------------------------------------------------------------------


def write_wizardlm(sft: Path, good_70k: bool = True) -> None:
    """WizardLM's two released files, in their released shapes (JSON arrays)."""
    sft.mkdir(parents=True, exist_ok=True)
    v2 = [
        {"idx": "pbhDzBB", "conversations": [
            {"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "7."}]},
        {"idx": "Kx1XyNu", "conversations": [
            {"from": "human", "value": "Two plus two?"}, {"from": "gpt", "value": "Four."},
            {"from": "human", "value": "Times three?"}, {"from": "gpt", "value": "Twelve."}]},
    ]  # fmt: skip
    (sft / "WizardLM_evol_instruct_V2_143k.json").write_text(json.dumps(v2, indent=4))
    evol_70k = [{"instruction": "Write a haiku about rain.", "output": "Soft rain on the roof."},
                {"instruction": "Define entropy.", "output": "A measure of disorder."}]  # fmt: skip
    if not good_70k:
        evol_70k = [{"instruction": r["instruction"], "response": r["output"]} for r in evol_70k]
    (sft / "alpaca_evol_instruct_70k.json").write_text(json.dumps(evol_70k))


def test_wizardlm_setting_reads_both_released_files_by_default(tmp_path):
    write_wizardlm(tmp_path / "sft")
    cfg = compose_config("task=sft", "sft=wizardlm", f"data_dir={tmp_path}")
    assert {name: src.format for name, src in cfg.sft.sources.items()} == {
        "evol_instruct_v2": "sharegpt", "evol_instruct_70k": "alpaca"}  # fmt: skip
    convs = load_conversations(cfg, TOK)
    assert convs == [
        conv("Name a prime.", "7.", source="evol_instruct_v2"),
        conv("Two plus two?", "Four.", "Times three?", "Twelve.", source="evol_instruct_v2"),
        conv("Write a haiku about rain.", "Soft rain on the roof.", source="evol_instruct_70k"),
        conv("Define entropy.", "A measure of disorder.", source="evol_instruct_70k"),
    ]


def test_a_source_that_keeps_nothing_stops_the_setting_even_when_another_has_data(tmp_path):
    write_wizardlm(tmp_path / "sft", good_70k=False)
    cfg = compose_config("task=sft", "sft=wizardlm", f"data_dir={tmp_path}")
    message = r"^sft\.sources\.evol_instruct_70k \(alpaca\): no conversation kept \(records 2, malformed 2, "
    with pytest.raises(ConfigError, match=message):
        load_conversations(cfg, TOK)
