"""task=diff between run directories, snapshots and this command's overrides; exit 0 equal, 1 different, 2 bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.tasks.diff import run

REPO = Path(__file__).resolve().parents[2]
# A real Hydra run directory in under a second: task=carbon on the report's stage 1, whose data
# mix interpolates ${data_dir}, so the saved (unresolved) config is resolved by the diff.
RUN = ("task=carbon", "experiment=xgen_7b_s1_2k", "carbon.chip_hours=1")


def xgen(*overrides: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xgen.run", *overrides], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two run directories: the same command, but the second with optimizer.lr=1e-4 and
    (edited afterwards, as if run elsewhere) another JAX in its provenance."""
    root = tmp_path_factory.mktemp("runs")
    one, two = root / "one", root / "two"
    for run_dir, extra in ((one, ()), (two, ("optimizer.lr=1e-4",))):
        proc = xgen(*RUN, *extra, f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((two / "provenance.json").read_text())
    record["packages"]["jax"] = "0.0.1"
    (two / "provenance.json").write_text(json.dumps(record))
    return one, two


def test_two_runs_differ_only_in_the_changed_key_and_the_provenance(runs, tmp_path):
    one, two = runs
    proc = xgen("task=diff", f"diff.a={one}", f"diff.b={two}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    jax_version = json.loads((one / "provenance.json").read_text())["packages"]["jax"]
    assert [line for line in proc.stdout.splitlines() if line.startswith("  ")] == [
        "  optimizer.lr: 0.0003 -> 0.0001",
        f"  provenance.packages.jax: {jax_version} -> 0.0.1",
    ]
    assert "optimizer:\n  optimizer.lr" in proc.stdout  # grouped under its config group


def test_a_run_against_this_commands_overrides_as_json(runs, tmp_path):
    one, _ = runs
    proc = xgen("task=diff", f"diff.a={one}", *RUN[1:], "optimizer.lr=1e-4", "diff.json=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {
        "a": f"run {one}",
        "b": "this command (experiment=xgen_7b_s1_2k carbon.chip_hours=1 optimizer.lr=1e-4)",
        "equal": False,
        "config": {"optimizer": [{"key": "optimizer.lr", "a": 0.0003, "b": 0.0001}]},
        "provenance": None,
    }


def test_a_run_equals_the_command_that_made_it(runs, tmp_path):
    one, _ = runs
    proc = xgen("task=diff", f"diff.a={one}", *RUN[1:], f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "equal"


def test_a_snapshot_equals_its_command_and_differs_from_a_changed_one(tmp_path, capsys):
    proc = xgen(
        "task=diff", "diff.a=stage.s3_8k", "model=xgen_7b", "hardware=tpu_v4_512", "stage=s3_8k", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    result = run(
        compose_config("task=diff", "diff.a=stage.s3_8k", "model=xgen_7b", "hardware=tpu_v4_512", "stage=s4_code_8k"), tmp_path
    )
    assert result.exit_code == 1 and {"stage", "data_mix"} == {key.split(".")[0] for key in result.config}
    assert "  stage.name: s3_8k -> s4_code_8k" in capsys.readouterr().out


def test_a_run_against_a_snapshot_compares_the_task_too(runs, tmp_path, capsys):
    one, _ = runs
    result = run(compose_config("task=diff", "diff.a=experiment.xgen_7b_s1_2k", f"diff.b={one}"), tmp_path)
    assert result.config == {"task.name": ("pretrain", "carbon"), "carbon.chip_hours": (None, 1.0)}
    assert result.provenance is None  # a snapshot has none


def test_a_run_resolved_against_another_data_dir(runs, tmp_path, capsys):
    one, _ = runs
    result = run(compose_config("task=diff", f"diff.a={one}", *RUN[1:], "data_dir=/elsewhere"), tmp_path)
    assert result.config["data_dir"] == ("data", "/elsewhere")
    assert result.config["data_mix.sources.code.path"] == ("data/prepared/code", "/elsewhere/prepared/code")


def test_keys_one_side_lacks_are_listed_as_added_and_removed(tmp_path, capsys):
    edited = (REPO / "snapshots" / "stage.s3_8k.yaml").read_text().replace("  lr: 0.0003\n", "  lr_typo: 0.0003\n")
    (tmp_path / "edited.yaml").write_text(edited)
    result = run(
        compose_config("task=diff", "diff.a=stage.s3_8k", f"diff.b={tmp_path / 'edited.yaml'}", "diff.json=true"), tmp_path
    )
    assert json.loads(capsys.readouterr().out)["config"] == {
        "optimizer": [{"key": "optimizer.lr", "a": 0.0003}, {"key": "optimizer.lr_typo", "b": 0.0003}]
    }
    assert result.exit_code == 1


def test_bad_inputs_end_in_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken" / ".hydra").mkdir(parents=True)
    (tmp_path / "broken" / ".hydra" / "config.yaml").write_text("optimizer: {lr: [\n")
    for spec, needle in [
        (tmp_path / "empty", "no .hydra/config.yaml there"),
        ("no_such_snapshot", "no such run directory, YAML file or snapshot (snapshots: experiment.xgen_7b_s1_2k"),
        (tmp_path / "broken", "not a readable config"),
    ]:
        proc = xgen("task=diff", f"diff.a={spec}", f"hydra.run.dir={tmp_path / 'out'}")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xgen: config error: diff.a=") and needle in lines[0], proc.stderr
    with pytest.raises(ConfigError, match="task=diff needs diff.a="):
        run(compose_config("task=diff"), tmp_path)
