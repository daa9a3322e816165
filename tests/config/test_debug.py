"""debug=fast cuts any run down: it comes last in the defaults list, so it wins over the groups
that set the same keys (stage, sft, experiment), while the command line still wins over it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("group", ["stage=s3_8k", "sft=synthetic", "experiment=xgen_7b_s1_2k", "model=small"])
def test_debug_fast_wins_over_the_groups_before_it(group):
    cfg = compose_config(group, "debug=fast")
    assert (cfg.stage.seq_len, cfg.stage.batch_tokens, cfg.trainer.steps) == (32, 128, 3)
    # An explicit model= on the command line is the user's choice; a group's choice is not.
    assert cfg.model.name == ("small" if group == "model=small" else "tiny")


def test_the_command_line_wins_over_debug_fast():
    cfg = compose_config("debug=fast", "trainer.steps=9", "stage.seq_len=64")
    assert (cfg.trainer.steps, cfg.stage.seq_len, cfg.stage.batch_tokens) == (9, 64, 128)


def test_debug_fast_leaves_the_data_mix_alone():
    assert compose_config("debug=fast", "data_mix=synthetic").data_mix == compose_config("data_mix=synthetic").data_mix


def test_a_debug_fast_run_takes_3_logged_steps_and_keeps_one_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "debug=fast", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
