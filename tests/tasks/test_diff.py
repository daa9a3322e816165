"""task=diff between run directories, snapshots and this command's overrides; exit 0 equal, 1 different, 2 bad input."""

from __future__ import annotations

import json
import os
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


def xgen(*overrides: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xgen.run", *overrides], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


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
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    (tmp_path / "list.yaml").write_text("- optimizer\n- lr\n")
    for spec, needle in [
        (tmp_path / "empty", "no .hydra/config.yaml there"),
        ("no_such_snapshot", "no such run directory, YAML file or snapshot (snapshots: experiment.python_demo, experiment.xgen_7b_s1_2k"),
        (tmp_path / "broken", "not a readable config (while parsing a flow node"),
        (tmp_path / "empty.yaml", f"{tmp_path / 'empty.yaml'}: empty (no YAML document in it), so not a config"),
        (tmp_path / "list.yaml", f"{tmp_path / 'list.yaml'}: not a config (its top level is a list, not a mapping"),
    ]:
        proc = xgen("task=diff", f"diff.a={spec}", f"hydra.run.dir={tmp_path / 'out'}")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xgen: config error: diff.a=") and needle in lines[0], proc.stderr
    with pytest.raises(ConfigError, match="task=diff needs diff.a="):
        run(compose_config("task=diff"), tmp_path)


# Billion laughs: nine lines that expand to 9^9 (387 million) values.
ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{inner}'] * 9)}]\n" for inner, name in zip("abcdefgh", "bcdefghi")
)


def test_diff_prints_an_environment_interpolation_literally(tmp_path):
    """Diffing someone's run must not print this machine's secrets: `${oc.env:...}` in a run's
    saved config or in a YAML file is compared and printed as written, on both sides."""
    home = tmp_path / "home-of-whoever-runs-the-diff"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XGEN_TEST_SECRET": "hunter2-do-not-print"}
    (tmp_path / "someones_run" / ".hydra").mkdir(parents=True)
    (tmp_path / "someones_run" / ".hydra" / "config.yaml").write_text(
        "seed: 0\ntoken: ${oc.env:XGEN_TEST_SECRET}\nhome: ${oc.env:HOME}\ncache: ${home}/cache\n"
    )
    (tmp_path / "file.yaml").write_text("seed: 0\ntoken: none\nhome: ${oc.env:HOME}/x\ncache: ${home}\n")
    proc = xgen(
        "task=diff", f"diff.a={tmp_path / 'someones_run'}", f"diff.b={tmp_path / 'file.yaml'}",
        f"hydra.run.dir={tmp_path / 'out'}", env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("  ")] == [
        '  token: "${oc.env:XGEN_TEST_SECRET}" -> none',  # quoted, as YAML would need it
        '  home: "${oc.env:HOME}" -> "${oc.env:HOME}/x"',
        '  cache: "${oc.env:HOME}/cache" -> "${oc.env:HOME}/x"',
    ]
    for secret in (str(home), "hunter2-do-not-print"):
        assert secret not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_diff_refuses_an_alias_bomb_in_one_line(tmp_path):
    """A hang here would time the subprocess out: the bomb is refused before it is expanded."""
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    proc = xgen("task=diff", f"diff.a={tmp_path / 'bomb.yaml'}", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"xgen: config error: diff.a={tmp_path / 'bomb.yaml'}: refused: its aliases expand to more than 100,000 "
        "values (a saved config has a few hundred; an alias bomb has billions)"
    ]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_diff_refuses_an_alias_bomb_in_a_run_directory_naming_its_saved_config(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match="aliases expand to more than") as refused:
        run(compose_config("task=diff", f"diff.a={tmp_path / 'run'}"), tmp_path)
    assert str(refused.value).startswith(f"diff.a={tmp_path / 'run' / '.hydra' / 'config.yaml'}: refused")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty (no YAML document in it), so not a config"),
        ("# a comment, and nothing else\n", "empty (no YAML document in it), so not a config"),
        ("- optimizer.lr\n- 0.0003\n", "not a config (its top level is a list, not a mapping of keys)"),
        ("0.0003\n", "not a config (its top level is the scalar '0.0003', not a mapping of keys)"),
        ("optimizer.lr=1e-4\n", "not a config (its top level is the scalar 'optimizer.lr=1e-4', not a mapping of keys)"),
    ],
)
def test_diff_refuses_an_empty_or_non_mapping_yaml_in_one_line(tmp_path, text, needle):
    """Not an empty config that differs from everything: a file that is no config at all."""
    (tmp_path / "side.yaml").write_text(text)
    with pytest.raises(ConfigError) as refused:
        run(compose_config("task=diff", f"diff.b={tmp_path / 'side.yaml'}"), tmp_path)
    assert str(refused.value) == f"diff.b={tmp_path / 'side.yaml'}: {needle}"
