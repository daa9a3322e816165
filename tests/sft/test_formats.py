"""Instruction datasets → conversations: each format's parser, the planted fixtures, the
min_tokens filter and max_examples sampling, and config mistakes as one-line errors.
(The released file layouts themselves: test_released_layouts.py.)"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from xgen.config import ConfigError, SFTSourceConfig
from xgen.sft import Conversation, Turn, load_source
from xgen.sft.synthetic import FACTS, PLANTED, SCROLLS_LONG, SCROLLS_SHORT, WRONG, main, write_fixtures
from xgen.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.xgen()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    return write_fixtures(tmp_path_factory.mktemp("sft"))


def load_records(tmp_path: Path, tok: Tokenizer, fmt: str, records: list, **cfg):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_source("s", SFTSourceConfig(format=fmt, paths=[str(path)], **cfg), tok, seed=0)


def conv(*texts: str, system: str | None = None) -> Conversation:
    """Alternating user/assistant turns from plain strings, as source "s"."""
    return Conversation(tuple(Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)), system, "s")


# --- one hand-written record per format ---------------------------------------------------


def test_alpaca_joins_instruction_and_input(tmp_path, tok):
    convs, counts = load_records(tmp_path, tok, "alpaca", [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": " Name a color. ", "input": "", "output": "Teal.\n"},
        {"instruction": "Count.", "output": "1 2 3"},  # no input at all
    ])  # fmt: skip
    assert convs == [conv("Translate.\n\nBonjour", "Hello"), conv("Name a color.", "Teal."), conv("Count.", "1 2 3")]
    assert counts == {"records": 3, "malformed": 0, "too_short": 0, "kept": 3, "sampled": 3}


def test_dolly_joins_instruction_and_context(tmp_path, tok):
    convs, _ = load_records(tmp_path, tok, "dolly", [
        {"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada.", "category": "closed_qa"},
        {"instruction": "Why?", "context": "", "response": "Because.", "category": "open_qa"},
    ])  # fmt: skip
    assert convs == [conv("Who?\n\nAda wrote it.", "Ada."), conv("Why?", "Because.")]


def test_sharegpt_system_leading_gpt_and_trailing_human(tmp_path, tok):
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "gpt", "value": "Hi there."},  # leading assistant turn: dropped
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "user", "value": "Q2"},
        {"from": "chatgpt", "value": "A2"},
        {"from": "human", "value": "Thanks"},  # trailing user turn: dropped
    ]
    convs, counts = load_records(tmp_path, tok, "sharegpt", [{"id": "x", "conversations": turns}])
    assert convs == [conv("Q1", "A1", "Q2", "A2", system="Be brief.")]
    assert counts["malformed"] == 0


@pytest.mark.parametrize(
    "turns, reason",
    [
        ([("human", "Q"), ("human", "Q again"), ("gpt", "A")], "roles"),
        ([("human", "Q"), ("system", "late"), ("gpt", "A")], "roles"),
        ([("narrator", "Q"), ("gpt", "A")], "roles"),
        ([("gpt", "A"), ("human", "Q")], "empty"),
        ([("human", "Q"), ("gpt", "  ")], "value"),
        ([], "empty"),
    ],
)
def test_sharegpt_malformed_records_are_counted_by_reason(tmp_path, tok, turns, reason):
    record = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    convs, counts = load_records(tmp_path, tok, "sharegpt", [record, {"conversations": "nope"}, good])
    assert convs == [conv("Q", "A")]
    assert counts[f"malformed:{reason}"] == 1 and counts["malformed:conversations"] == 1 and counts["malformed"] == 2


def test_baize_splits_markers_and_drops_the_empty_last_human(tmp_path, tok):
    text = (
        "The conversation between human and AI assistant.\n"
        "[|Human|] Hi\n[|AI|]  Hello! \n[|Human|] How?\n[|AI|] Like this.\n[|Human|] "
    )
    convs, _ = load_records(tmp_path, tok, "baize", [{"topic": "t", "input": text}])
    assert convs == [conv("Hi", "Hello!", "How?", "Like this.")]


def test_scrolls_is_input_then_output(tmp_path, tok):
    record = {"id": "1", "pid": "1_0", "input": "Q\n\nDoc", "output": "Summary"}
    convs, _ = load_records(tmp_path, tok, "scrolls", [record])
    assert convs == [conv("Q\n\nDoc", "Summary")]


def reply(text, rank, replies=(), role="assistant", **extra):
    return {"text": text, "role": role, "rank": rank, "replies": list(replies), **extra}


def test_oasst_follows_the_highest_ranked_path(tmp_path, tok):
    follow_up = reply("Q2", 0, [reply("bad", 1), reply("A2", 0), reply("worse", None)], role="prompter")
    tree = {
        "message_tree_id": "t",
        "prompt": {"text": "Q1", "role": "prompter", "replies": [
            reply("deleted best", 0, deleted=True),
            reply("rejected best", -1, review_result=False),
            reply("unranked", None),
            reply("A1", 1, [follow_up, reply("Q2 other", 1, role="prompter")]),
            reply("A1 tie", 1),
        ]},
    }  # fmt: skip
    convs, _ = load_records(tmp_path, tok, "oasst", [tree])
    assert convs == [conv("Q1", "A1", "Q2", "A2")]


def test_oasst_null_ranks_ties_and_trimming_to_an_assistant_turn(tmp_path, tok):
    unranked = {"prompt": {"text": "Q", "role": "prompter", "replies": [
        reply("first", None, [reply("dangling question", 0, role="prompter")]), reply("second", None)]}}
    deleted_only = {"prompt": {"text": "Q", "role": "prompter", "replies": [reply("A", 0, deleted=True)]}}
    convs, counts = load_records(tmp_path, tok, "oasst", [unranked, deleted_only, {"message_tree_id": "no prompt"}])
    assert convs == [conv("Q", "first")]
    assert counts["malformed:empty"] == 1 and counts["malformed:prompt"] == 1


def test_oasst_nan_rank_is_a_null_rank(tmp_path, tok):
    """A null rank read through pandas is NaN; as a number it would make min() order-dependent."""
    tree = {"prompt": {"text": "Q", "role": "prompter", "replies": [reply("nan", float("nan")), reply("ranked", 1)]}}
    convs, _ = load_records(tmp_path, tok, "oasst", [tree])
    assert convs == [conv("Q", "ranked")]


@pytest.mark.parametrize(
    "fmt, record, reason",
    [
        ("alpaca", {"instruction": "I", "input": 3, "output": "O"}, "input"),
        ("alpaca", {"instruction": "", "output": "O"}, "instruction"),
        ("dolly", {"instruction": "I", "context": "", "response": None}, "response"),
        ("baize", {"input": "no markers at all"}, "empty"),
        ("baize", {"input": "[|Human|] a\n[|AI|] \n[|Human|] b\n[|AI|] c"}, "input"),
        ("scrolls", {"input": "doc", "output": ""}, "output"),
        ("scrolls", ["not", "a", "record"], "record"),
    ],
)
def test_missing_empty_or_mistyped_fields_are_counted(tmp_path, tok, fmt, record, reason):
    # The only record is bad, so the source keeps nothing: the error carries the counts.
    counts = rf"records 1, malformed 1, malformed:{reason} 1, too_short 0, kept 0"
    with pytest.raises(ConfigError, match=rf"^sft\.sources\.s \({fmt}\): no conversation kept \({counts}\)$"):
        load_records(tmp_path, tok, fmt, [record])


# --- files ---------------------------------------------------------------------------------


def test_json_file_may_be_an_array_or_json_lines_and_globs_expand(tmp_path, tok):
    records = [{"instruction": f"I{i}", "output": f"O{i}"} for i in range(4)]
    (tmp_path / "a.json").write_text(json.dumps(records[:2], indent=2))
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in records[2:]) + "\nnot json\n\n")
    convs, counts = load_source("s", SFTSourceConfig(format="alpaca", paths=[str(tmp_path / "*.json")]), tok, 0)
    assert [c.turns[0].content for c in convs] == ["I0", "I1", "I2", "I3"]
    assert counts["records"] == 5 and counts["malformed:json"] == 1


def test_fixtures_every_format_loads_with_the_planted_counts(fixtures, tok):
    for fmt, path in fixtures.items():
        convs, counts = load_source(fmt, SFTSourceConfig(format=fmt, paths=[str(path)]), tok, seed=0)
        reasons = {k: v for k, v in counts.items() if k.startswith("malformed:")}
        assert reasons == PLANTED[fmt], fmt
        assert counts["malformed"] == sum(reasons.values())
        assert counts["records"] == counts["kept"] + counts["malformed"] + counts["too_short"]
        assert counts["kept"] == counts["sampled"] == len(convs) > 0
        for c in convs:
            assert c.source == fmt and c.turns[-1].role == "assistant"
            assert [t.role for t in c.turns] == ["user", "assistant"] * (len(c.turns) // 2)
            assert all(t.content and t.content == t.content.strip() for t in c.turns)
            assert WRONG not in [t.content for t in c.turns], fmt  # oasst: only the best path


def test_fixtures_teach_every_fact_in_the_single_turn_formats(fixtures, tok):
    questions, answers = zip(*FACTS)
    assert len(FACTS) == 40 and len(set(questions)) == len(set(answers)) == 40
    for fmt in ("alpaca", "dolly"):
        convs, _ = load_source(fmt, SFTSourceConfig(format=fmt, paths=[str(fixtures[fmt])]), tok, seed=0)
        assert sorted(c.turns[1].content for c in convs) == sorted(answers)
    for fmt in ("sharegpt", "oasst", "baize"):  # multi-turn: every fact once, question then answer
        convs, _ = load_source(fmt, SFTSourceConfig(format=fmt, paths=[str(fixtures[fmt])]), tok, seed=0)
        pairs = [(c.turns[i].content, c.turns[i + 1].content) for c in convs for i in range(0, len(c.turns), 2)]
        assert sorted(p for p in pairs if p in FACTS) == sorted(FACTS), fmt
    assert {p.suffix for p in fixtures.values()} >= {".json", ".jsonl", ".gz", ".parquet"}
    with gzip.open(fixtures["oasst"]) as fh:  # gzipped JSON Lines, as OpenAssistant's export
        assert json.loads(fh.readline())["prompt"]["role"] == "prompter"


def test_fixtures_are_deterministic_and_fast(tmp_path, capsys):
    start = time.perf_counter()
    first = write_fixtures(tmp_path / "a")
    assert time.perf_counter() - start < 2.0
    assert main([str(tmp_path / "b")]) == 0 and "scrolls" in capsys.readouterr().out
    for fmt, path in first.items():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), fmt
    other = write_fixtures(tmp_path / "c", seed=1)
    assert other["sharegpt"].read_bytes() != first["sharegpt"].read_bytes()


def test_scrolls_min_tokens_drops_the_short_documents(fixtures, tok):
    cfg = SFTSourceConfig(format="scrolls", paths=[str(fixtures["scrolls"])], min_tokens=4000)
    convs, counts = load_source("scrolls_x", cfg, tok, seed=0)
    assert counts["too_short"] == SCROLLS_SHORT and counts["kept"] == len(convs) == SCROLLS_LONG
    assert all(sum(len(tok.encode_ordinary(t.content)) for t in c.turns) >= 4000 for c in convs)
    everything, _ = load_source("scrolls_x", SFTSourceConfig(format="scrolls", paths=cfg.paths), tok, seed=0)
    short = [c for c in everything if c not in convs]
    assert len(short) == SCROLLS_SHORT
    assert all(sum(len(tok.encode_ordinary(t.content)) for t in c.turns) < 2000 for c in short)


def test_max_examples_samples_in_order_deterministically_per_seed(tmp_path, tok):
    records = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(50)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = SFTSourceConfig(format="alpaca", paths=[str(path)], max_examples=10)

    def sample(seed: int) -> list[int]:
        convs, counts = load_source("s", cfg, tok, seed)
        assert counts["kept"] == 50 and counts["sampled"] == 10
        return [int(c.turns[0].content.split()[1]) for c in convs]

    first = sample(0)
    assert first == sorted(first) and len(set(first)) == 10  # original order, no repeats
    assert sample(0) == first and sample(1) != first
    cfg.max_examples = 500  # more than there are: all of them
    assert len(load_source("s", cfg, tok, 0)[0]) == 50


def test_json_lines_that_break_the_parser_are_counted_not_raised(tmp_path, tok):
    """Deep nesting raises RecursionError and a 5,000-digit number ValueError (Python's int
    digit limit), neither a JSONDecodeError: both are one bad line among good ones."""
    path = tmp_path / "a.jsonl"
    good = json.dumps({"instruction": "I", "output": "O"})
    path.write_text("\n".join([good, "[" * 200_000, '{"instruction": "I", "output": ' + "7" * 5000 + "}", good]) + "\n")
    convs, counts = load_source("s", SFTSourceConfig(format="alpaca", paths=[str(path)]), tok, 0)
    assert len(convs) == 2 and counts["records"] == 4 and counts["malformed:json"] == 2


@pytest.mark.parametrize("bad", ["[" * 200_000, "7" * 5000], ids=["deep", "long_int"])
def test_json_array_that_breaks_the_parser_is_one_line_naming_the_file(tmp_path, tok, bad):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "I", "output": "O"},\n {"instruction": "I", "output": ' + bad + "}]")
    with pytest.raises(ConfigError, match=r"^sft\.sources\.s: .*a\.json: not valid JSON \([^\n]+\)$"):
        load_source("s", SFTSourceConfig(format="alpaca", paths=[str(path)]), tok, 0)


def test_dangling_symlinks_are_skipped_with_one_warning_that_counts_them(tmp_path, tok, caplog):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "I", "output": "O"}) + "\n")
    for name in ("b.jsonl", "c.jsonl"):  # a download cache whose blobs are gone
        os.symlink(tmp_path / "blobs" / name, tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="xgen.sft.formats"):
        convs, _ = load_source("s", SFTSourceConfig(format="alpaca", paths=[str(tmp_path / "*.jsonl")]), tok, 0)
    assert len(convs) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sft.sources.s.paths: skipped 2 dangling symlinks" in warnings[0]


@pytest.mark.parametrize("pattern", ["b.jsonl", "*.jsonl"])
def test_a_pattern_of_only_dangling_symlinks_matches_no_file(tmp_path, tok, pattern):
    os.symlink(tmp_path / "blobs" / "b.jsonl", tmp_path / "b.jsonl")
    with pytest.raises(ConfigError, match=r"paths: .* matches no file \(only 1 dangling symlinks, e\.g\. .*b\.jsonl\)"):
        load_source("s", SFTSourceConfig(format="alpaca", paths=[str(tmp_path / pattern)]), tok, 0)


# --- config mistakes -------------------------------------------------------------------------


def test_a_source_that_keeps_nothing_is_one_line_with_its_counts(tmp_path, tok):
    """Other sources would otherwise hide it: a wrong format reads every record as malformed."""
    records = [{"instruction": "I", "output": "O"}] * 3
    counts = r"records 3, malformed 3, malformed:response 3, too_short 0, kept 0"
    with pytest.raises(ConfigError, match=rf"^sft\.sources\.s \(dolly\): no conversation kept \({counts}\)$"):
        load_records(tmp_path, tok, "dolly", records)
    with pytest.raises(ConfigError, match=r"^sft\.sources\.s \(alpaca\): .*too_short 3, kept 0\)$"):
        load_records(tmp_path, tok, "alpaca", records, min_tokens=100)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"records 0, malformed 0, too_short 0, kept 0"):
        load_source("s", SFTSourceConfig(format="alpaca", paths=[str(tmp_path / "empty.jsonl")]), tok, 0)



def test_unknown_format_names_the_source(fixtures, tok):
    with pytest.raises(ConfigError, match=r"sft\.sources\.mine\.format='vicuna'"):
        load_source("mine", SFTSourceConfig(format="vicuna", paths=[str(fixtures["alpaca"])]), tok, 0)


@pytest.mark.parametrize("pattern", ["missing.json", "nothing-*.jsonl"])
def test_path_matching_no_file_names_the_source(tmp_path, tok, pattern):
    with pytest.raises(ConfigError, match=r"sft\.sources\.mine\.paths: .*matches no file"):
        load_source("mine", SFTSourceConfig(format="alpaca", paths=[str(tmp_path / pattern)]), tok, 0)


@pytest.mark.parametrize(
    "name, data",
    [
        ("notes.json", b"Just some notes,\nnot JSON at all.\n"),
        ("broken.json", b'[{"instruction": "a", "output": "b"},'),
        ("cut.jsonl.gz", gzip.compress(b'{"instruction": "a", "output": "b"}\n' * 200, mtime=0)[:60]),
        ("fake.jsonl.gz", b"plain text, not gzip"),
        ("fake.parquet", b"not parquet"),
        ("data.csv", b"instruction,output\n"),
    ],
    ids=["notes.json", "broken.json", "cut.jsonl.gz", "fake.jsonl.gz", "fake.parquet", "data.csv"],  # xdist compares ids
)
def test_unreadable_file_names_the_file(tmp_path, tok, name, data):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError, match=rf"sft\.sources\.mine: .*{name}"):
        load_source("mine", SFTSourceConfig(format="alpaca", paths=[str(tmp_path / name)]), tok, 0)


def test_without_pyarrow_scrolls_is_json_lines_and_parquet_says_what_to_install(tmp_path, tok, monkeypatch):
    pytest.importorskip("pyarrow")
    with_parquet = write_fixtures(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow → ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    without = write_fixtures(tmp_path)
    assert without["scrolls"].name == "scrolls.jsonl" and not with_parquet["scrolls"].exists()
    _, counts = load_source("s", SFTSourceConfig(format="scrolls", paths=[str(tmp_path / "scrolls.*")]), tok, 0)
    assert counts["kept"] == SCROLLS_LONG + SCROLLS_SHORT
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"sft\.sources\.s: .*x\.parquet: .*pip install 'xgen\[parquet\]'"):
        load_source("s", SFTSourceConfig(format="scrolls", paths=[str(tmp_path / "x.parquet")]), tok, 0)
