"""task=carbon: the report's own figures, and chip-hours measured or planned from run dirs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.tasks.carbon import footprint, run

REPO = Path(__file__).resolve().parents[2]


def test_the_reports_numbers():
    """Section 6: 270,336 TPU v4 hours x 192 W x PUE 1.10 ≈ 57 MWh; x 0.079 ≈ 4.5 tCO2eq."""
    result = footprint(270_336, 192.0, 1.10, 0.079)
    assert result["mwh"] == pytest.approx(57.095, abs=1e-3)
    assert result["tco2eq"] == pytest.approx(4.51, abs=1e-2)


def test_the_command_writes_carbon_json_with_the_hardware_files_power(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=carbon", "hardware=tpu_v4_512", "carbon.chip_hours=270336",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "carbon.json").read_text())
    assert result["chip_power_w"] == 192.0 and result["pue"] == 1.1
    assert round(result["mwh"]) == 57 and round(result["tco2eq"], 1) == 4.5
    assert "57.095 MWh" in proc.stdout


def test_chip_hours_measured_from_stage_runs_and_planned_from_a_plan(tmp_path):
    for stage, (wall_s, chips) in {"s1_2k": (3600.0, 8), "s2_4k": (1800.0, 16)}.items():
        (tmp_path / stage / ".hydra").mkdir(parents=True)
        (tmp_path / stage / "summary.json").write_text(json.dumps({"wall_s": wall_s}))
        (tmp_path / stage / ".hydra" / "config.yaml").write_text(f"hardware:\n  num_devices: {chips}\n")
    out = tmp_path / "out"
    out.mkdir()
    result = run(compose_config("task=carbon", "hardware=tpu_v4_8", f"run_dir={tmp_path}"), out)
    assert result["chip_hours"] == pytest.approx(8 + 8)  # 1 h x 8 chips + 0.5 h x 16 chips
    assert result["mwh"] == pytest.approx(16 * 192 * 1.1 / 1e6)

    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    (plan_dir / "plan.json").write_text(json.dumps({"tokens_per_s": 1e6, "chips": 512}))
    cfg = compose_config("task=carbon", "hardware=tpu_v4_512", f"run_dir={plan_dir}", "carbon.tokens=3600000000")
    assert run(cfg, out)["chip_hours"] == pytest.approx(3600 * 512 / 3600)


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="carbon.chip_hours"):
        run(compose_config("task=carbon", "hardware=tpu_v4_8"), tmp_path)
    with pytest.raises(ConfigError, match="neither summary.json"):
        run(compose_config("task=carbon", "hardware=tpu_v4_8", f"run_dir={tmp_path}"), tmp_path)
    with pytest.raises(ConfigError, match="chip_power_w"):
        run(compose_config("task=carbon", "carbon.chip_hours=1"), tmp_path)
