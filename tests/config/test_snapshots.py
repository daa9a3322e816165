"""snapshots/ holds what conf/ composes for the report's runs; a drift fails here, key by key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xgen.config import snapshots
from xgen.config.snapshots import SNAPSHOT_DIR, WRITE_COMMAND, compare, conf_dir, render, runs

REPO = Path(__file__).resolve().parents[2]
RUNS = runs(conf_dir())


def test_every_report_run_has_a_snapshot():
    assert {"experiment.xgen_7b_s1_2k", "stage.s3_8k", "stage.s5_32k"} <= set(RUNS)
    stored = {p.name.removesuffix(".yaml") for p in SNAPSHOT_DIR.glob("*.yaml")}
    assert stored == set(RUNS), (
        f"missing: {sorted(set(RUNS) - stored)}, stale: {sorted(stored - set(RUNS))}; run `{WRITE_COMMAND}`"
    )


@pytest.mark.parametrize("name", sorted(RUNS))
def test_snapshot_matches_what_conf_composes(name):
    path = SNAPSHOT_DIR / f"{name}.yaml"
    stored = path.read_text() if path.exists() else None
    drift = compare(name, stored, render(RUNS[name], conf_dir()))
    assert drift is None, f"{path.name} drifted from conf/:\n  " + "\n  ".join(drift.lines) + f"\nrun `{WRITE_COMMAND}`"


def test_a_snapshot_is_what_cfg_job_resolve_prints():
    overrides = RUNS["experiment.xgen_7b_s5_32k"]
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", *overrides, "--cfg", "job", "--resolve"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = (SNAPSHOT_DIR / "experiment.xgen_7b_s5_32k.yaml").read_text().split("\n", 2)[2]
    assert proc.stdout == body


def test_snapshots_hold_nothing_of_this_machine():
    for path in SNAPSHOT_DIR.glob("*.yaml"):
        text = path.read_text()
        for machine in (str(REPO), str(Path.home()), "${"):
            assert machine not in text, f"{path.name} holds {machine!r}: snapshots must read the same on every machine"


def _copies(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of conf/ and snapshots written from it (independent of the repository's, which
    the tests above check)."""
    conf, stored = tmp_path / "conf", tmp_path / "snapshots"
    shutil.copytree(conf_dir(), conf, ignore=shutil.ignore_patterns("__pycache__"))
    assert len(snapshots.write(conf, stored)) == len(runs(conf))
    return conf, stored


def test_a_changed_default_fails_the_check_naming_its_runs_and_keys_until_rewritten(tmp_path, capsys):
    conf, stored = _copies(tmp_path)
    stage = conf / "stage" / "s3_8k.yaml"
    stage.write_text(stage.read_text().replace("token_budget: 300000000000", "token_budget: 250000000000"))

    assert snapshots.main(["--conf", str(conf), "--snapshots", str(stored)]) == 1
    shown = capsys.readouterr().out
    changed = ["experiment.xgen_7b_s3_8k", "stage.s3_8k"]  # the stage on its own and in its experiment, no other
    line = "stage.token_budget: 300000000000 -> 250000000000"
    assert [line for line in shown.splitlines() if line.startswith("drifted")] == [f"drifted {stored / n}.yaml:" for n in changed]
    for name in changed:
        assert f"drifted {stored / name}.yaml:\n  {line}\n" in shown

    assert snapshots.main(["--write", "--conf", str(conf), "--snapshots", str(stored)]) == 0
    assert snapshots.main(["--conf", str(conf), "--snapshots", str(stored)]) == 0
    assert "token_budget: 250000000000" in (stored / "stage.s3_8k.yaml").read_text()


def test_a_removed_experiment_drops_its_snapshot_on_rewrite(tmp_path):
    conf, stored = _copies(tmp_path)
    (conf / "experiment" / "xgen_7b_s5_32k.yaml").unlink()
    assert [(d.name, d.lines) for d in snapshots.write(conf, stored)] == [
        ("experiment.xgen_7b_s5_32k", ["no longer a run: its experiment file is gone"])
    ]
    assert not (stored / "experiment.xgen_7b_s5_32k.yaml").exists()
