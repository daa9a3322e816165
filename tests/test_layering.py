"""Imports point down: the layering of docs/design.md, checked on the source and at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

XGEN = Path(__file__).resolve().parents[1] / "xgen"
# Packages that inference, conversion and evaluation are built from: none may reach up into
# the trainer (they read checkpoints through xgen.checkpoint, the loss through xgen.model).
BELOW_TRAINING = ["generate", "hf", "eval", "sft", "model", "data", "tokenizer", "parallel", "serve", "runtime.py", "checkpoint.py"]
# What the runtime is built from may not import it (nor anything that uses it).
BELOW_RUNTIME = ["model", "parallel", "data", "tokenizer", "checkpoint.py", "config"]


def files_of(package: str) -> list[Path]:
    path = XGEN / package
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", BELOW_TRAINING)
def test_nothing_below_training_imports_the_trainer(package):
    offenders = {
        f"{path.relative_to(XGEN.parent)}: {name}"
        for path in files_of(package)
        for name in imported_modules(path)
        if name == "xgen.train" or name.startswith("xgen.train.")
    }
    assert not offenders, sorted(offenders)


@pytest.mark.parametrize("package", BELOW_RUNTIME)
def test_the_runtimes_parts_do_not_import_it_or_its_users(package):
    above = ("xgen.runtime", "xgen.train", "xgen.generate", "xgen.eval", "xgen.sft", "xgen.serve", "xgen.hf", "xgen.tasks")
    offenders = {
        f"{path.relative_to(XGEN.parent)}: {name}"
        for path in files_of(package)
        for name in imported_modules(path)
        if any(name == a or name.startswith(a + ".") for a in above)
    }
    assert not offenders, sorted(offenders)


def test_the_walk_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from xgen.train import checkpoint\n")
    assert "xgen.train.checkpoint" in imported_modules(probe)


def test_the_model_imports_neither_hydra_nor_the_config_store():
    code = (
        "import sys, xgen.model, xgen.model.loss\n"
        "bad = sorted(m for m in sys.modules if m == 'hydra' or m.startswith('hydra.') or m == 'xgen.config.store')\n"
        "print(','.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""
