"""The report's 2K -> 4K -> 8K schedule: stage hand-off and resuming at the right stage."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.peak_memory import run_measuring_peak
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


@pytest.mark.slow
def test_the_32k_stage_trains_tiny_on_the_cpu_in_a_few_gib(tmp_path):
    """stage=s5_32k (past the report: 32,768-token sequences, YaRN over the 8K model) composes
    and trains the tiny model for a step, with the tiled kernel and a chunked loss; the
    process's peak memory is measured (docs/long-context.md gives the figure)."""
    cfg = compose_config("stage=s5_32k", "model=tiny")
    assert (cfg.stage.seq_len, cfg.model.max_positions) == (32768, 32768)
    assert (cfg.model.rope_scaling.type, cfg.model.rope_scaling.factor, cfg.model.rope_scaling.original_max_positions) == (
        "yarn", 4.0, 8192)  # fmt: skip
    proc, peak = run_measuring_peak(
        "stage=s5_32k", "execution.attention=block_causal", "execution.attention_chunk=512", "execution.loss_chunk=2048",
        "stage.batch_tokens=32768", "trainer.steps=1", "trainer.log_every=1", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1] and recs[0]["tokens_seen"] == 32768
    peak_gib = peak / 2**30
    print(f"s5_32k tiny: peak RSS {peak_gib:.2f} GiB")
    # The compiled step needs 1.43 GiB; [32K, 51,200] float32 logits alone (no loss_chunk) are 6.25 GiB.
    assert peak_gib < 4, f"the 32K tiny step took {peak_gib:.1f} GiB"


def test_pretrain_all_can_continue_into_the_32k_stage_on_its_own_chunk():
    """task.stages may end with s5_32k: it gets the YaRN model over 32K positions while the
    stages before keep theirs, and a mix that splits its data must give it a chunk of its own
    (reading the whole mix would train again on the other stages' documents)."""
    from hydra import initialize_config_dir

    from tests.conftest import CONF_DIR
    from xgen.config import ConfigError
    from xgen.config.validate import validate
    from xgen.tasks.pretrain_all import stage_configs

    cfg = compose_config("task=pretrain_all", "task.stages=[s3_8k,s5_32k]")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        s3, s5 = stage_configs(cfg)
    assert (s3.model.max_positions, s3.model.rope_scaling.type) == (8192, "default")
    assert (s5.model.max_positions, s5.model.rope_scaling.type, s5.stage.init_from_stage) == (32768, "yarn", "s3_8k")
    assert s3.model.d_model == s5.model.d_model and s3.model.n_layers == s5.model.n_layers  # same weights continue
    assert "s5_32k" in compose_config("data_mix=stage1").data_mix.stage_split
    # Stage 2's mixes include stage 1's and clear its split (null; `{}` would merge and keep
    # it): every stage reads all of them, and s4_code_8k is not refused.
    for mix in ("stage2_starcoder", "stage2_the_stack", "synthetic_stage2"):
        assert compose_config(f"data_mix={mix}").data_mix.stage_split == {}, mix
    with pytest.raises(ConfigError, match=r"stage=s5_32k has no chunk in data_mix=stage1's stage_split \(s1_2k, s2_4k, s3_8k\)"):
        validate(compose_config("stage=s5_32k", "data_mix=stage1", "~data_mix.stage_split.s5_32k"))
