"""provenance.json: the commit, the packages and the devices behind a run, or why one is unknown."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from xgen import provenance

REPO = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_commit_and_whether_the_code_a_run_executes_changed(tmp_path):
    (tmp_path / "xgen").mkdir()
    (tmp_path / "xgen" / "a.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    assert provenance.source(tmp_path) == {"commit": _git(tmp_path, "rev-parse", "HEAD"), "dirty": False, "changed": []}

    (tmp_path / "notes.md").write_text("not code\n")  # outside xgen/ and conf/: still clean
    assert provenance.source(tmp_path)["dirty"] is False
    (tmp_path / "xgen" / "a.py").write_text("x = 2\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "new.yaml").write_text("a: 1\n")
    assert provenance.source(tmp_path) | {"commit": None} == {"commit": None, "dirty": True, "changed": ["xgen/a.py", "conf/"]}


def test_no_checkout_or_no_git_is_said_never_raised(tmp_path, monkeypatch):
    assert provenance.source(tmp_path)["reason"].startswith("not a git checkout")
    (tmp_path / "inner").mkdir()
    _git(tmp_path, "init", "-q")  # a virtualenv inside some other repository
    assert "not a git checkout's root" in provenance.source(tmp_path / "inner")["reason"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert provenance.source(tmp_path) == {"commit": None, "reason": "git is not installed"}


def test_package_versions_come_from_the_installed_metadata():
    versions = provenance.packages(("jax", "no-such-distribution"))
    assert versions == {"jax": metadata.version("jax"), "no-such-distribution": None, "python": platform.python_version()}


def test_tasks_without_devices_never_start_jax():
    code = "import sys; from xgen import provenance; r = provenance.collect(False, 'diff'); print('jax' in sys.modules, r['devices'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False {'reason': 'task=diff runs on no devices'}"


def test_a_training_run_directory_records_its_provenance(tmp_path):
    checkout = (REPO / ".git").exists()
    head_before = _git(REPO, "rev-parse", "HEAD") if checkout else None
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "trainer.steps=1", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "provenance.json").read_text())
    if checkout:  # HEAD read before and after: a commit may land while the run starts
        assert record["source"]["commit"] in {head_before, _git(REPO, "rev-parse", "HEAD")}
        assert isinstance(record["source"]["dirty"], bool)
    else:
        assert record["source"]["commit"] is None and record["source"]["reason"]
    assert set(provenance.PACKAGES) | {"python"} == set(record["packages"])
    assert record["packages"]["jax"] == metadata.version("jax") and record["packages"]["orbax-checkpoint"]
    import jax

    assert record["devices"] == {"platform": "cpu", "count": jax.device_count(), "kind": "cpu", "processes": 1}
