"""What every benchmark shares: reading records in the public formats with one-line errors,
resuming finished items, and progress lines."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from xgen.config import ConfigError
from xgen.eval.common import TRUNCATION_SIDES, ItemStore, Progress, markdown, read_records, require_file, truncate_tokens


def test_records_are_read_from_jsonl_gzip_json_arrays_and_parquet(tmp_path):
    rows = [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "r.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    for name in ("r.jsonl", "r.jsonl.gz", "r.json", "r.parquet"):
        assert read_records(tmp_path / name, "test") == rows, name


def test_a_bad_line_or_a_missing_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ConfigError) as ex:
        read_records(tmp_path / "bad.jsonl", "HumanEval")
    assert f"HumanEval: {tmp_path}/bad.jsonl line 2 is not JSON" in str(ex.value) and "\n" not in str(ex.value)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="line 1 is not a JSON object"):
        read_records(tmp_path / "list.jsonl", "x")
    with pytest.raises(ConfigError, match=f"file not found: expected {tmp_path}/gone.jsonl \\(set eval.data_path\\)"):
        require_file(tmp_path / "gone.jsonl", "x")


def test_finished_items_come_back_only_with_the_same_settings(tmp_path):
    path = tmp_path / "bench_partial.jsonl"
    store = ItemStore(path, {"n": 2, "stop": ("a",)})
    store.add("t/0", {"score": 1.5})
    store.add("t/1", [1, 2])
    with open(path, "a") as f:
        f.write('{"_id": "t/2", "_sett')  # an interrupted write
    again = ItemStore(path, {"n": 2, "stop": ["a"]})
    assert "t/0" in again and again.get("t/1") == [1, 2] and "t/2" not in again
    assert not ItemStore(path, {"n": 3, "stop": ["a"]}).done
    assert not ItemStore(None, {}).done


def test_progress_logs_counts_and_an_eta(caplog):
    progress = Progress("bench", total=4, every_s=0)
    with caplog.at_level(logging.INFO, logger="xgen.eval.common"):
        progress.advance(1)
        progress.advance(3, "task b")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("bench: 1/4, ETA ") and lines[1] == "bench: 4/4 (task b), ETA 0 s"


def test_markdown_tables():
    assert markdown([["a", "b"], ["1", "2"]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |\n"


def test_truncation_keeps_the_end_the_start_or_both_ends():
    ids = list(range(10))
    assert truncate_tokens(ids, 4, "left") == [6, 7, 8, 9]
    assert truncate_tokens(ids, 4, "right") == [0, 1, 2, 3]
    assert truncate_tokens(ids, 4, "middle") == [0, 1, 8, 9]
    assert truncate_tokens(ids, 5, "middle") == [0, 1, 2, 8, 9]  # the odd token goes to the start
    assert truncate_tokens(ids, 1, "middle") == [0] and truncate_tokens(ids, 0, "middle") == []
    for side in TRUNCATION_SIDES:
        assert truncate_tokens(ids, 10, side) == ids and truncate_tokens(ids, 12, side) == ids
    with pytest.raises(ConfigError, match="eval.truncation='top' is not one of left, right, middle"):
        truncate_tokens(ids, 3, "top")


@pytest.mark.parametrize(
    "override,needle",
    [("eval.limit=0", "eval.limit=0 must be a finite number > 0"), ("eval.batch_size=0", "eval.batch_size=0 must be a finite number > 0")],
)  # fmt: skip
def test_eval_settings_are_checked_at_start_up(override, needle):
    from tests.conftest import compose_config
    from xgen.config.validate import validate

    validate(compose_config("task=eval", "eval=summarization"))
    with pytest.raises(ConfigError, match=needle):
        validate(compose_config("task=eval", "eval=summarization", override))


def test_the_truncation_side_is_a_choice_hydra_checks_at_composition():
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose_config

    with pytest.raises(ConfigCompositionException) as info:
        compose_config("task=eval", "eval=summarization", "eval.truncation=top")
    assert "expected one of [left, right, middle]" in str(info.value.__cause__ or info.value)
