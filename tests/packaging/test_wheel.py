"""A built wheel runs without the source tree: configs ship inside the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_trains_from_a_fresh_environment(tmp_path):
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)], tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("xgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"xgen/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)[:5]
    assert "xgen/tokenizer/gpt2.tiktoken" in names

    # A fresh environment: the dependencies come from this interpreter's site-packages, xgen
    # only from the wheel, and the working directory holds no source tree.
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path).returncode == 0
    python = str(venv / "bin" / "python")
    installed = run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([python, "-c", "import xgen; print(xgen.__file__)"], elsewhere)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr

    job = run([python, "-m", "xgen.run", "--cfg", "job"], elsewhere)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "name: tiny" in job.stdout and "data_mix:" in job.stdout

    trained = run([python, "-m", "xgen.run", "trainer.steps=2", "hydra.run.dir=run"], elsewhere)
    assert trained.returncode == 0, trained.stderr[-2000:]
    records = [json.loads(line) for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
