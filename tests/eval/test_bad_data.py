"""Damaged benchmark files are one line naming the file (and row) before any model loads
(issue 15): every case runs with a checkpoint that does not exist, so an error about the
data proves the data was read first."""

from __future__ import annotations

import gzip

import pytest

from xgen.config import ConfigError
from xgen.eval.fixtures.humaneval import write as write_humaneval
from xgen.eval.fixtures.mmlu import write_mmlu

NO_MODEL = "checkpoint=/nonexistent/model"


def refusal(run_eval, tmp_path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        run_eval(tmp_path / "run", NO_MODEL, f"data_dir={tmp_path / 'data'}", *overrides)
    line = str(info.value)
    assert "\n" not in line and "/nonexistent/model" not in line, line
    return line


def mmlu(tmp_path):
    return write_mmlu(tmp_path / "data" / "mmlu", subjects=["astronomy", "virology"], n_dev=5, n_test=3)


def test_mmlu_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path, run_eval):
    path = mmlu(tmp_path) / "test" / "virology_test.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = lines[1].replace(b"Which", b"Wh\xefch")
    path.write_bytes(lines[0] + damaged + lines[2])
    offset = len(lines[0]) + damaged.index(b"\xef")
    assert refusal(run_eval, tmp_path, "eval=mmlu_5shot") == f"MMLU: {path} line 2 is not UTF-8 (byte 0xef at offset {offset})"


def test_mmlu_an_empty_test_file_is_refused_unless_allowed(tmp_path, run_eval):
    path = mmlu(tmp_path) / "test" / "astronomy_test.csv"
    path.write_text("")
    assert f"MMLU: {path} has no questions" in refusal(run_eval, tmp_path, "eval=mmlu_5shot")


def test_mmlu_a_dev_file_too_short_for_the_shots_is_refused_not_fewer_shot(tmp_path, run_eval):
    path = mmlu(tmp_path) / "dev" / "virology_dev.csv"
    path.write_text("")
    line = refusal(run_eval, tmp_path, "eval=mmlu_5shot")
    assert f"MMLU: {path} has 0 rows, fewer than eval.shots=5" in line
    # 0-shot needs no dev rows at all.
    with pytest.raises(ConfigError, match="no such directory"):
        run_eval(tmp_path / "run0", NO_MODEL, f"data_dir={tmp_path / 'data'}", "eval=mmlu_0shot")


@pytest.mark.parametrize(
    "row,needle",
    [
        ("q,a,b,c,d\n", "row 1 has 5 fields, not question,A,B,C,D,answer"),
        ("q,a,b,c,d,E\n", "row 1: answer 'E' is not one of A, B, C, D"),
        ("q,a,b,c,d, A\n", "row 1: answer ' A' is not one of A, B, C, D"),
        ("None,a,b,c,d,A\n", "row 1 has no question ('None' reads as NaN)"),
    ],
)
def test_mmlu_a_malformed_row_names_the_row(tmp_path, run_eval, row, needle):
    path = mmlu(tmp_path) / "test" / "astronomy_test.csv"
    path.write_text(row)
    assert refusal(run_eval, tmp_path, "eval=mmlu_5shot") == f"MMLU: {path} {needle}"


def humaneval(tmp_path):
    write_humaneval(tmp_path / "data")
    (path,) = (tmp_path / "data").rglob("HumanEval.jsonl.gz")
    return path


def test_humaneval_a_truncated_gzip_is_one_line(tmp_path, run_eval):
    path = humaneval(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert refusal(run_eval, tmp_path, "eval=humaneval").startswith(f"HumanEval: {path} cannot be read as gzip")


def test_humaneval_a_file_that_is_not_gzip_is_one_line(tmp_path, run_eval):
    path = humaneval(tmp_path)
    path.write_bytes(gzip.decompress(path.read_bytes()))  # plain JSON Lines under the .gz name
    assert refusal(run_eval, tmp_path, "eval=humaneval").startswith(f"HumanEval: {path} cannot be read as gzip")


def test_humaneval_invalid_utf8_names_the_line(tmp_path, run_eval):
    path = humaneval(tmp_path)
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    lines[1] = lines[1].replace(b"def ", b"d\xffef ", 1)
    path.write_bytes(gzip.compress(b"".join(lines)))
    assert refusal(run_eval, tmp_path, "eval=humaneval") == f"HumanEval: {path} line 2 is not UTF-8 (byte 0xff)"
