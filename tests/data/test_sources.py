"""The built-in corpora: the stdlib source lists exactly the interpreter's own `.py` files."""

import sysconfig
from pathlib import Path

from xgen.data.sources import _python_files, python_stdlib


def test_the_walk_skips_site_packages_at_any_depth_and_keeps_only_py_files(tmp_path):
    for rel in ("a.py", "pkg/b.py", "pkg/notes.txt", "site-packages/torch/c.py", "pkg/site-packages/d.py", "pkg/sub/e.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in _python_files(tmp_path)) == ["a.py", "pkg/b.py", "pkg/sub/e.py"]


def test_the_stdlib_list_equals_rglob_without_site_packages_codec_tables_and_test_suites():
    """The walk replaced `rglob` for speed; the files and their order (which seeds the
    sample) must be rglob's, less the folders that are not library code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "encodings", "test", "tests", "idle_test"}
    want = sorted(p for p in root.rglob("*.py") if not skipped & set(p.relative_to(root).parts[:-1]))
    assert len(want) > 500 and sorted(_python_files(root)) == want
    assert not any("encodings" in p.parts or "test" in p.parts for p in want)
    assert python_stdlib(5, seed=0) == python_stdlib(5, seed=0) and len(python_stdlib(5, seed=0)) == 5
