"""Runs that last weeks: checkpoints by time, the hang watchdog, a checkpoint under another
step's name, and a run made longer on resume (where the wall time of a killed run went:
tests/train/test_checkpoints.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen import exits
from xgen.tasks import run_task
from xgen.train.cadence import SaveCadence

REPO = Path(__file__).resolve().parents[2]
FAST = ("stage.seq_len=32", "stage.batch_tokens=128", "data_mix.sources.python_stdlib.max_documents=20", "trainer.log_every=1")


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run_dir)}


def stop_at(run_dir: Path, step: int) -> None:
    """The run as if it had been stopped right after its checkpoint at `step`."""
    for path in (run_dir / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)
    kept = [json.dumps(r) + "\n" for r in records(run_dir) if r["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(kept))


def test_a_checkpoint_under_another_steps_name_is_refused_and_every_step_is_still_trained(tmp_path):
    run = (*FAST, "optimizer.decay_steps=8", "trainer.checkpoint_every=2", "trainer.steps=6")
    straight = tmp_path / "straight"
    run_task(compose_config(*run), straight)
    copied = tmp_path / "copied"
    shutil.copytree(straight, copied)
    stop_at(copied, 4)
    # Step 4's checkpoint copied as "99": once, a 6-step run took it as finished, exit 0.
    shutil.copytree(copied / "checkpoints" / "4", copied / "checkpoints" / "99")
    run_task(compose_config(*run), copied)
    assert by_step(copied, "loss") == by_step(straight, "loss")
    (damaged,) = [e for e in records(copied, "events.jsonl") if e["event"] == "checkpoint_damaged"]
    assert damaged["step"] == 99 and "records step 4, not the step 99" in damaged["why"]
    assert [p.name.split("-")[0] for p in (copied / "damaged_checkpoints").iterdir()] == ["99"]


def test_a_finished_run_whose_newest_checkpoint_is_another_steps_trains_what_is_missing(tmp_path):
    run = (*FAST, "optimizer.decay_steps=8", "trainer.checkpoint_every=2", "trainer.steps=6")
    run_dir = tmp_path / "run"
    run_task(compose_config(*run), run_dir)
    final = by_step(run_dir, "loss")
    shutil.rmtree(run_dir / "checkpoints" / "6")
    shutil.copytree(run_dir / "checkpoints" / "4", run_dir / "checkpoints" / "6")  # "done", but holds step 4
    stop_at(run_dir, 4)
    run_task(compose_config(*run), run_dir)
    assert by_step(run_dir, "loss") == final


def test_a_longer_run_on_resume_keeps_the_learning_rate_continuous_and_a_later_resume_keeps_its_course(tmp_path):
    """trainer.steps 8 -> 12 at step 4 (the decay follows the run's length): once the rate
    jumped to where a 12-step cosine would be; now it goes on from its value at step 4."""
    run = (*FAST, "optimizer.warmup_steps=2", "optimizer.decay_steps=null", "trainer.checkpoint_every=2", "trainer.checkpoints_to_keep=10")
    straight = tmp_path / "straight"
    run_task(compose_config(*run, "trainer.steps=8"), straight)
    longer = tmp_path / "longer"
    shutil.copytree(straight, longer)
    stop_at(longer, 4)
    extend = (*run, "trainer.steps=12", "trainer.allow_changes=[trainer.steps]")
    run_task(compose_config(*extend), longer)
    lr, before = by_step(longer, "learning_rate"), by_step(straight, "learning_rate")
    assert lr[5] == pytest.approx(before[5], rel=1e-6)  # the first resumed step: the rate the run had
    assert all(lr[s] > lr[s + 1] for s in range(5, 12))  # then down, without a step up
    end = compose_config(*run).optimizer.lr * compose_config(*run).optimizer.min_lr_ratio
    # Step s applies the rate at s - 1: a cosine from step 4's rate to the final one at step 12.
    assert lr[12] == pytest.approx(end + (lr[5] - end) * 0.5 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-5)
    (event,) = [e for e in records(longer, "events.jsonl") if e["event"] == "schedule_extended"]
    assert (event["step"], event["from_total"], event["to_total"]) == (4, 8, 12)
    # Resumed again, the extended course comes from the checkpoint: the same numbers.
    again = tmp_path / "again"
    shutil.copytree(longer, again)
    stop_at(again, 8)
    run_task(compose_config(*extend), again)
    assert by_step(again, "learning_rate") == lr and by_step(again, "loss") == by_step(longer, "loss")


def test_checkpoints_by_time_and_by_steps_on_one_process():
    now = [0.0]
    cadence = SaveCadence(every_steps=5, minutes=2, clock=lambda: now[0])
    due = []
    for step in range(1, 16):
        now[0] += 25.0  # 25 s a step: two minutes pass after the 5th step since the last save
        if cadence.due(step):
            due.append(step)
            cadence.saved()
    assert due == [5, 10, 15]  # by steps; each save restarts the clock
    cadence = SaveCadence(every_steps=0, minutes=1, clock=lambda: now[0])
    due = []
    for step in range(1, 8):
        now[0] += 25.0  # a minute has passed after every third step since the last save
        if cadence.due(step):
            due.append(step)
            cadence.saved()
    assert due == [3, 6]


WATCHED = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from tests.conftest import compose_config
    from xgen.data import build_pipeline
    from xgen.runtime import Runtime
    from xgen.tokenizer import Tokenizer
    from xgen.train.trainer import Trainer

    cfg = compose_config(*sys.argv[2:])
    pipeline = build_pipeline(cfg.data_mix, cfg.stage, Tokenizer.from_name(cfg.tokenizer.name))

    def read_that_never_returns():
        threading.Event().wait()

    class Stuck:
        def __init__(self, batches):
            self.batches, self.n = batches, 0
        def __iter__(self):
            return self
        def __next__(self):
            self.n += 1
            if self.n == 4:
                read_that_never_returns()
            return next(self.batches)
        def get_state(self):
            return self.batches.get_state()
        def set_state(self, state):
            self.batches.set_state(state)
        def close(self):
            self.batches.close()

    pipeline.iterator = lambda it=pipeline.iterator: Stuck(it())
    Trainer(cfg, Path(sys.argv[1]), Runtime.of(cfg)).fit(pipeline)
    """
)


def test_a_step_that_hangs_ends_the_run_with_every_threads_stack_in_the_log_and_exit_124(tmp_path):
    script = tmp_path / "watched.py"
    script.write_text(WATCHED)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = [sys.executable, str(script), str(run_dir), *FAST, "trainer.steps=20", "trainer.step_timeout_minutes=0.03"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == exits.HANG, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("xgen: hang:")]
    assert "after step 3" in line and str(run_dir / "run.log") in line
    stacks = (run_dir / "run.log").read_text()
    assert line in stacks and "most recent call first" in stacks  # the line, then faulthandler's dump
    assert "read_that_never_returns" in stacks  # the stack names where the step hangs
    assert "Traceback" not in proc.stderr
    assert max(by_step(run_dir, "loss")) == 3  # the steps before the hang were logged
