"""Sweeps as users run them: `-m` with Hydra's Optuna sweeper and the shipped search
(conf/hydra/sweeper/xgen_lr_optuna.yaml), optimizing what each run returns (xgen/objective.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF_DIR, compose_config
from xgen.objective import HEADLINES, objective
from xgen.tasks.eval import BENCHMARKS

REPO = Path(__file__).resolve().parents[1]
SEARCH = yaml.safe_load((CONF_DIR / "hydra" / "sweeper" / "xgen_lr_optuna.yaml").read_text())


def test_an_optuna_sweep_of_three_debug_runs_names_the_best_trial_and_its_final_loss(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = ["-m", "hydra/sweeper=xgen_lr_optuna", "hydra.sweeper.n_trials=3", "debug=fast", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "xgen.run", *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "A new study created" in proc.stderr  # Optuna's own log line, which colorlog coloured
    assert "\x1b[" not in proc.stderr + proc.stdout  # even into a pipe, before NO_COLOR
    trials = {}
    for job in sorted(p for p in tmp_path.iterdir() if p.is_dir()):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        params = {k: float(overrides[k]) for k in SEARCH["params"]}
        trials[json.dumps(params, sort_keys=True)] = json.loads((job / "summary.json").read_text())["final_loss"]
    assert len(trials) == 3  # three runs, three different points of the search space
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == set(SEARCH["params"]) and math.isfinite(result["best_value"])
    best = json.dumps({k: float(v) for k, v in result["best_params"].items()}, sort_keys=True)
    assert result["best_value"] == trials[best] == min(trials.values())  # the runs' own final losses, minimized


def test_the_search_space_names_keys_of_the_config():
    compose_config(*(f"{key}=1" for key in SEARCH["params"]))  # a misspelt key fails to compose
    assert SEARCH["direction"] == "minimize"


def test_training_tasks_return_their_final_loss():
    assert objective("pretrain", {"final_loss": 2.5, "steps": 3}) == 2.5
    assert objective("pretrain_all", [{"final_loss": 3.0}, {"final_loss": 2.0}]) == 2.0  # the last stage
    assert objective("sft", {"final_loss": 2.0}) == 2.0
    assert objective("sft", {"final_loss": 2.0, "heldout_response_loss": {"base": 3.0, "final": 2.4}}) == 2.4
    assert objective("pretrain", {"final_loss": None}) is None  # a finished run trained nothing
    assert objective("plan", {"fits": True}) is None


def test_every_benchmark_has_a_headline_for_sweeps():
    assert set(HEADLINES) == set(BENCHMARKS)
