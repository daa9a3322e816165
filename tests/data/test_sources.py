"""The built-in corpora: the stdlib source lists exactly the interpreter's own `.py` files."""

import sysconfig
from pathlib import Path

from xgen.data.sources import _python_files, python_stdlib


def test_the_walk_skips_site_packages_at_any_depth_and_keeps_only_py_files(tmp_path):
    for rel in ("a.py", "pkg/b.py", "pkg/notes.txt", "site-packages/torch/c.py", "pkg/site-packages/d.py", "pkg/sub/e.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in _python_files(tmp_path)) == ["a.py", "pkg/b.py", "pkg/sub/e.py"]


def test_the_stdlib_list_equals_rglob_without_site_packages():
    """The walk replaced `rglob` for speed; the files and their order (which seeds the
    sample) must not change."""
    root = Path(sysconfig.get_paths()["stdlib"])
    want = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    assert len(want) > 500 and sorted(_python_files(root)) == want
    assert python_stdlib(5, seed=0) == python_stdlib(5, seed=0) and len(python_stdlib(5, seed=0)) == 5
