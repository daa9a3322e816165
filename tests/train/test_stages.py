"""The report's 2K -> 4K -> 8K schedule: stage hand-off and resuming at the right stage."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.config import OptimizerConfig
from xgen.train.optimizer import lr_schedule

REPO = Path(__file__).resolve().parents[2]

STEPS = 1  # per stage: the hand-off, not the training, is under test


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(run_dir, *overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_pretrain_all_chains_the_stages_and_resumes_at_the_right_one(synthetic_data, tmp_path):
    overrides = [
        # Two of the three stages (2K -> 4K): the 8K stage's step alone costs what these two do.
        "task=pretrain_all", "task.stages=[s1_2k,s2_4k]", "data_mix=synthetic", f"data_dir={synthetic_data}",
        "model=tiny", "execution.attention=chunked", "stage.batch_tokens=4096", f"trainer.steps={STEPS}",
        "trainer.log_every=1", "optimizer.warmup_steps=1",
    ]  # fmt: skip
    run_cli(tmp_path, *overrides)
    # One schedule over all the stages' steps: warmup 1 step, then cosine to 10% at the end.
    sched = lr_schedule(OptimizerConfig(lr=3e-4, warmup_steps=1), 2 * STEPS)
    for k, stage in enumerate(("s1_2k", "s2_4k")):
        recs = records(tmp_path / stage)
        assert [r["step"] for r in recs] == [k * STEPS + i for i in range(1, STEPS + 1)]
        assert all(r["tokens_seen"] == r["step"] * 4096 for r in recs)
        for r in recs:
            assert r["learning_rate"] == pytest.approx(float(sched(r["step"] - 1)), rel=1e-5)
        summary = json.loads((tmp_path / stage / "summary.json").read_text())
        assert summary["steps"] == (k + 1) * STEPS and summary["steps_this_run"] == STEPS
    log = (tmp_path / "run.log").read_text()
    assert "steps of 2 x 2048 tokens" in log and "steps of 1 x 4096 tokens" in log
    assert "starting from" in log and f"s1_2k/checkpoints at step {STEPS}" in log

    # Interrupted before the last stage ended: running it again trains only that stage.
    shutil.rmtree(tmp_path / "s2_4k")
    run_cli(tmp_path, *overrides)
    for stage, trained in (("s1_2k", 0), ("s2_4k", STEPS)):
        assert json.loads((tmp_path / stage / "summary.json").read_text())["steps_this_run"] == trained
    assert records(tmp_path / "s2_4k")[0]["step"] == STEPS + 1


def test_a_stage_refuses_a_missing_start_checkpoint_in_one_line(tmp_path):
    from xgen.config import ConfigError
    from xgen.train.trainer import Trainer

    cfg = compose_config("stage=s2_4k", f"trainer.init_from={tmp_path / 'nowhere'}", "trainer.steps=1")
    with pytest.raises(ConfigError, match="trainer.init_from=.*no complete checkpoint"):
        Trainer(cfg, tmp_path)
