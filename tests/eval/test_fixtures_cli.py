"""`python -m xgen.eval.fixtures`: help is help (not a folder named --help), and benchmarks
are named as task=eval names them (mt_bench, mmlu_5shot) or by their module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xgen.eval.fixtures.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def test_help_prints_usage_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.eval.fixtures", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m xgen.eval.fixtures") and "mt_bench" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_benchmark_by_its_eval_name(tmp_path, capsys):
    assert main([str(tmp_path), "mt_bench", "mmlu_5shot"]) == 0
    assert (tmp_path / "mt_bench" / "question.jsonl").is_file() and (tmp_path / "mmlu" / "dev").is_dir()
    assert not (tmp_path / "humaneval").exists()
