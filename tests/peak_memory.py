"""`python -m xgen.run` in a child process, with that process's own peak resident memory.

Not `getrusage`: Linux keeps a process's `ru_maxrss` across fork and exec, so a child started
by a pytest worker that already holds 2 GiB reports at least that. `VmHWM` in
/proc/self/status belongs to the child's own address space, made new at exec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = """
import runpy, sys
sys.argv = ["xgen.run", *sys.argv[1:]]
try:
    runpy.run_module("xgen.run", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak_rss_bytes", kib * 1024)
"""


def run_measuring_peak(*overrides: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, int | None]:
    """The finished process (stdout and stderr captured) and its peak RSS in bytes (None if it failed)."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *overrides], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    found = proc.stdout.rsplit("peak_rss_bytes", 1)
    return proc, int(found[1]) if proc.returncode == 0 and len(found) == 2 else None
