"""A result belongs to the model, data and settings that made it (issue 15): a rerun in the
same run directory reuses a finished item only when all three are the same; otherwise it
says what differs, keeps the old records aside, and computes afresh."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging

import pytest

from xgen.eval.common import ItemStore, model_identity
from xgen.eval.fixtures.mmlu import write_mmlu

MMLU = ("eval=mmlu_5shot", "eval.limit=2", "generate.max_len=512")


@pytest.fixture(scope="module")
def other_checkpoint(tiny_model, tmp_path_factory):
    """A second parameters-only checkpoint: the same architecture, other weights."""
    from flax import nnx

    from xgen.checkpoint import save_params
    from xgen.model.transformer import XGenModel

    cfg, _, _ = tiny_model
    params = nnx.state(XGenModel(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    path = tmp_path_factory.mktemp("other_ckpt")
    save_params(path, params, {"config": {"model": dataclasses.asdict(cfg)}})
    return path


def test_records_of_another_identity_are_not_reused_and_are_kept_aside(tmp_path, caplog):
    path = tmp_path / "x_partial.jsonl"
    a = ItemStore(path, {"shots": 5}, model={"params": "aaaa", "step": 1}, data="d1")
    a.add("one", 1)
    a.add("two", 2)
    with caplog.at_level(logging.WARNING):
        b = ItemStore(path, {"shots": 5}, model={"params": "bbbb", "step": 1}, data="d1")
    assert "one" not in b and "two" not in b
    assert "2 result(s) were made by another model, data or settings (model.params 'aaaa' -> 'bbbb')" in caplog.text
    aside = tmp_path / "x_partial.stale-1.jsonl"
    assert len(aside.read_text().splitlines()) == 2 and not path.exists()
    b.add("one", 10)
    # Back to the first model: its records are in the file put aside, not reused from there;
    # b's record is put aside in turn (a second stale file), nothing is overwritten.
    c = ItemStore(path, {"shots": 5}, model={"params": "aaaa", "step": 1}, data="d1")
    assert "one" not in c and (tmp_path / "x_partial.stale-2.jsonl").exists() and aside.exists()
    # The same identity resumes; a changed setting or data does not.
    c.add("one", 1)
    assert ItemStore(path, {"shots": 5}, model={"params": "aaaa", "step": 1}, data="d1").get("one") == 1
    assert "one" not in ItemStore(path, {"shots": 0}, model={"params": "aaaa", "step": 1}, data="d1")


def test_a_partial_file_from_before_identities_is_not_reused(tmp_path, caplog):
    path = tmp_path / "mmlu_5shot_partial.jsonl"
    path.write_text(json.dumps({"_id": "astronomy", "_settings": {"shots": 5}, "result": {"correct": 95}}) + "\n")
    with caplog.at_level(logging.WARNING):
        store = ItemStore(path, {"shots": 5}, model={"params": "aaaa"}, data="d1")
    assert "astronomy" not in store and "written before results carried their identity" in caplog.text


def test_the_model_identity_is_its_parameters_not_its_path(tiny_checkpoint, other_checkpoint, tmp_path):
    import shutil

    a, b = model_identity(tiny_checkpoint), model_identity(other_checkpoint)
    assert a["params"] != b["params"] and a["step"] == b["step"] == 0
    moved = tmp_path / "moved"
    shutil.copytree(tiny_checkpoint, moved)
    assert model_identity(moved)["params"] == a["params"]


def test_mmlu_rerun_with_another_checkpoint_data_or_setting_recomputes(
    tmp_path, run_eval, tiny_checkpoint, other_checkpoint, caplog
):
    data = tmp_path / "data"
    write_mmlu(data / "mmlu", subjects=["astronomy", "virology"], n_test=4)
    run_dir = tmp_path / "run"
    first = run_eval(run_dir, *MMLU, f"checkpoint={tiny_checkpoint}", f"data_dir={data}")
    fresh = run_eval(tmp_path / "fresh", *MMLU, f"checkpoint={other_checkpoint}", f"data_dir={data}")

    with caplog.at_level(logging.WARNING):
        second = run_eval(run_dir, *MMLU, f"checkpoint={other_checkpoint}", f"data_dir={data}")
    assert "2 result(s) were made by another model" in caplog.text and "model.params" in caplog.text
    assert second["subjects"] == fresh["subjects"] and second["identity"]["model"] == fresh["identity"]["model"]
    assert first["identity"]["model"]["params"] != second["identity"]["model"]["params"]
    saved = json.loads((run_dir / "mmlu_5shot.json").read_text())
    assert saved["identity"]["model"]["checkpoint"].startswith(str(other_checkpoint.resolve()))

    # A test file cut to one question: the data's fingerprint changes, the subject is rescored.
    test_file = data / "mmlu" / "test" / "astronomy_test.csv"
    with open(test_file, newline="") as f:
        rows = list(csv.reader(f))
    with open(test_file, "w", newline="") as f:
        csv.writer(f).writerows(rows[:1])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cut = run_eval(run_dir, *MMLU, f"checkpoint={other_checkpoint}", f"data_dir={data}")
    assert "data" in caplog.text and cut["subjects"]["astronomy"]["questions"] == 1

    # A setting that changes scores (the compute dtype): rescored too.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_eval(run_dir, *MMLU, f"checkpoint={other_checkpoint}", f"data_dir={data}", "execution.compute_dtype=bfloat16")
    assert "settings.execution.compute_dtype 'float32' -> 'bfloat16'" in caplog.text
