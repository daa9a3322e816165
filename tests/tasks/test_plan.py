"""task=plan compiles the real step for a TPU topology with libtpu (the `tpu` extra)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra (libtpu)")


def plan_cli(tmp_path, *overrides) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=plan", *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HBM per chip" in proc.stdout and "FLOPs per step" in proc.stdout
    return json.loads((tmp_path / "plan.json").read_text())


@pytest.mark.slow
@needs_libtpu
def test_plan_compiles_for_a_tpu_v4_slice_and_reports_memory_and_flops(tmp_path):
    plan = plan_cli(tmp_path, "model=small", "stage=s1_2k", "stage.batch_tokens=65536", "hardware=tpu_v4_8")
    assert plan["method"].startswith("compiled for v4:2x2x2")
    assert plan["fits"] and 0 < plan["hbm_per_chip_bytes"] < plan["hbm_capacity_bytes"] == 32 * 2**30
    # The compiler counts what the MFU formula counts (6 x matmul parameters + attention), to a
    # few percent; 6N over all parameters also counts the input embedding's gather.
    assert plan["flops_per_step"] / plan["flops_per_step_model"] == pytest.approx(1.0, abs=0.05)
    assert plan["flops_per_step_6n"] > plan["flops_per_step"]
    assert plan["tokens_per_s"] == pytest.approx(65536 / plan["step_time_s"])


@needs_libtpu
def test_plan_says_which_setting_to_change_when_it_does_not_fit(tmp_path):
    plan = plan_cli(tmp_path, "model=small", "stage=s1_2k", "hardware=tpu_v4_8")
    assert not plan["fits"] and "model.remat=full" in plan["verdict"]


def test_gpu_plan_is_the_analytic_estimate(tmp_path):
    plan = run_task(compose_config("task=plan", "model=xgen_7b", "stage=s3_8k", "hardware=gpu_1"), tmp_path)
    assert plan["method"].startswith("analytic")
    assert plan["params"] == 6_895_702_016 and plan["hbm_per_chip_bytes"] == 6_895_702_016 * 16
    assert not plan["fits"] and json.loads((tmp_path / "plan.json").read_text())["chips"] == 1
