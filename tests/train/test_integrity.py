"""Run integrity (issue 14): damaged checkpoints are refused and the run falls back to the
newest good one; stray step directories are never trusted; a resume continues the run its
checkpoint belongs to; the metrics files survive a kill (SIGINT and SIGTERM: test_checkpoints.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen import checkpoint
from xgen.config import ConfigError
from xgen.tasks import run_task
from xgen.train.metrics import MetricsLog
from xgen.train.resume import check_resume

REPO = Path(__file__).resolve().parents[2]
FAST = ("stage.seq_len=32", "stage.batch_tokens=128", "data_mix.sources.python_stdlib.max_documents=20",
        "optimizer.decay_steps=8", "trainer.checkpoint_every=2", "trainer.log_every=1")  # fmt: skip


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run with checkpoints at 2, 4 and 6 (`straight`); `copy_run`
    makes the same run stopped at step 4 (the schedule's length is fixed: step 4 is the same)."""
    root = tmp_path_factory.mktemp("integrity")
    run_task(compose_config(*FAST, "trainer.steps=6"), root / "straight")
    return root


def copy_run(four_steps: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps / "straight", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 4))
    return run_dir


def largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def flip_bytes(step_dir: Path) -> None:
    path = largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def truncate(step_dir: Path) -> None:
    path = largest_array_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete(step_dir: Path) -> None:
    largest_array_file(step_dir).unlink()


def garble_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": [1, 2')


def rewind_data(step_dir: Path) -> None:
    (step_dir / "data" / "metadata").write_text('{"next_index": 0}')


@pytest.mark.slow
def test_flipped_bytes_in_the_newest_checkpoint_are_refused_and_the_run_resumes_from_the_one_before(four_steps, tmp_path):
    run_dir = copy_run(four_steps, tmp_path)
    flip_bytes(run_dir / "checkpoints" / "4")
    run_task(compose_config(*FAST, "trainer.steps=6"), run_dir)
    (damaged,) = [e for e in events(run_dir) if e["event"] == "checkpoint_damaged"]
    assert damaged["step"] == 4 and "checkpoints/4" in damaged["why"]
    # Resumed from step 2: steps 3-6 are the uninterrupted run's, finite, to the last.
    got, want = losses(run_dir), losses(four_steps / "straight")
    assert [round(got[s], 5) for s in range(1, 7)] == [round(want[s], 5) for s in range(1, 7)]
    assert checkpoint.latest_step(run_dir / "checkpoints") == 6
    assert len(list((run_dir / "damaged_checkpoints").iterdir())) == 1  # kept, out of the way


@pytest.mark.parametrize("damage", [flip_bytes, truncate, delete, garble_metadata, rewind_data], ids=lambda f: f.__name__)
def test_each_kind_of_damage_is_caught_at_restore_and_the_older_checkpoint_used(four_steps, tmp_path, damage):
    from xgen.train.trainer import Trainer

    run_dir = copy_run(four_steps, tmp_path)
    damage(run_dir / "checkpoints" / "4")
    abstract = Trainer(compose_config(*FAST, "trainer.steps=6"), run_dir).abstract_state
    seen = []
    with checkpoint.open_manager(run_dir / "checkpoints", keep=3) as mngr:
        _, data, step, _ = checkpoint.restore_latest(mngr, abstract, on_damaged=lambda s, why: seen.append((s, why)))
    assert step == 2 and data["next_index"] > 0
    assert [s for s, _ in seen] == [4] and "checkpoints/4" in seen[0][1]


def test_an_empty_numeric_directory_is_not_a_checkpoint(four_steps, tmp_path):
    run_dir = copy_run(four_steps, tmp_path)
    (run_dir / "checkpoints" / "99").mkdir()
    assert checkpoint.latest_step(run_dir / "checkpoints") == 4
    summary = run_task(compose_config(*FAST, "trainer.steps=6"), run_dir)
    assert summary["steps_this_run"] == 2  # not "nothing to do: already at step 99"
    assert not (run_dir / "checkpoints" / "99").exists() and len(list((run_dir / "stray_checkpoints").iterdir())) == 1


@pytest.mark.parametrize(
    "override,key",
    [("optimizer.lr=1e-3", "optimizer.lr"), ("stage.seq_len=64", "stage.seq_len"), ("stage.batch_tokens=256", "stage.batch_tokens"),
     ("seed=1", "seed"), ("optimizer.decay_steps=null", "optimizer.decay_steps"), ("model.d_ff=64", "model.d_ff"),
     ("data_mix.sources.python_stdlib.max_documents=10", "data_mix.sources.python_stdlib.max_documents"),
     ("execution.compute_dtype=bfloat16", "execution.compute_dtype")],
)  # fmt: skip
def test_a_resume_that_changes_the_run_is_refused_naming_old_and_new(override, key):
    saved = json.loads(json.dumps(__import__("dataclasses").asdict(compose_config(*FAST, "trainer.steps=4"))))
    with pytest.raises(ConfigError, match=rf"{key}: .* -> .*trainer.allow_changes=\[{key}\]"):
        check_resume(saved, compose_config(*FAST, "trainer.steps=4", override), "run")
    allowed = check_resume(saved, compose_config(*FAST, "trainer.steps=4", override, f"trainer.allow_changes=[{key}]"), "run")
    assert key in allowed
    # Cadence and placement are not the run: they may change freely.
    assert check_resume(saved, compose_config(*FAST, "trainer.steps=4", "trainer.log_every=3", "hardware=cpu_8"), "run") == {}


def test_more_steps_under_the_schedules_own_length_continue_the_run_and_otherwise_are_refused():
    saved = json.loads(json.dumps(__import__("dataclasses").asdict(compose_config(*FAST, "trainer.steps=4"))))
    assert check_resume(saved, compose_config(*FAST, "trainer.steps=6"), "run") == {}
    free = json.loads(json.dumps(__import__("dataclasses").asdict(compose_config(*FAST, "trainer.steps=4", "optimizer.decay_steps=null"))))
    with pytest.raises(ConfigError, match=r"trainer.steps: 4 -> 6"):
        check_resume(free, compose_config(*FAST, "trainer.steps=6", "optimizer.decay_steps=null"), "run")


def test_a_resume_with_another_learning_rate_fails_in_one_line_and_an_allowed_one_is_recorded(four_steps, tmp_path):
    run_dir = copy_run(four_steps, tmp_path)
    with pytest.raises(ConfigError, match=r"optimizer.lr: 0.003 -> 0.001"):
        run_task(compose_config(*FAST, "trainer.steps=6", "optimizer.lr=1e-3"), run_dir)
    run_task(compose_config(*FAST, "trainer.steps=6", "optimizer.lr=1e-3", "trainer.allow_changes=[optimizer.lr]"), run_dir)
    (change,) = [e for e in events(run_dir) if e["event"] == "config_change"]
    assert change["step"] == 4 and change["changes"] == {"optimizer.lr": [0.003, 0.001]}


def test_the_metrics_files_survive_a_kill_between_truncate_and_write(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    (tmp_path / "events.jsonl").write_text("".join(json.dumps({"event": "spike", "step": s}) + "\n" for s in (2, 5)))
    before = metrics.read_text()

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies after writing the new file, before the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(tmp_path, resume_step=4)
    assert metrics.read_text() == before  # the old file, whole
    monkeypatch.undo()
    log = MetricsLog(tmp_path, resume_step=4)  # the torn last line is dropped
    log.close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert [e["step"] for e in events(tmp_path)] == [2]  # step 5's event will be replayed, not repeated


def test_checkpoints_to_keep_must_keep_one(tmp_path):
    from xgen.config.validate import validate

    with pytest.raises(ConfigError, match="trainer.checkpoints_to_keep=0 must be a finite number > 0"):
        validate(compose_config(*FAST, "trainer.checkpoints_to_keep=0"))


def test_a_non_finite_state_is_never_saved_and_the_run_ends_in_an_error(tmp_path, monkeypatch):
    """Parameters that went NaN (as a restore of damaged bytes once gave): no checkpoint of
    that state is written, so retention keeps the last good one, and the run fails loudly."""
    import jax
    import jax.numpy as jnp

    from xgen.train.trainer import Trainer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_task(compose_config(*FAST, "trainer.steps=2", "trainer.checkpoints_to_keep=1"), run_dir)
    restore = Trainer._restore

    def poisoned(self, mngr, batches, watchdog):
        state, meta = restore(self, mngr, batches, watchdog)
        return state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params)), meta

    monkeypatch.setattr(Trainer, "_restore", poisoned)
    with pytest.raises(SystemExit, match=r"not finite; not saved \(newest good checkpoint: step 2\)"):
        run_task(compose_config(*FAST, "trainer.steps=6", "trainer.checkpoints_to_keep=1"), run_dir)
    assert checkpoint.latest_step(run_dir / "checkpoints") == 2
    assert {e["step"] for e in events(run_dir) if e["event"] == "checkpoint_refused"} == {4, 6}
