"""provenance.json: what produced a run directory, beside the config that describes it.

Two runs of the same config can still differ by the code (the commit, uncommitted edits),
the libraries (a JAX upgrade changes numerics) or the devices; `task=diff` between two run
directories compares these too. Everything here is cheap (no `pip list`) and never fails a
run: what cannot be known is recorded with the reason.
"""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

FILE = "provenance.json"
# Distributions whose versions decide what a run computes or how it reads and writes.
PACKAGES = (
    "xgen", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
    "hydra-core", "omegaconf", "tiktoken", "numpy",
)  # fmt: skip
# The folder holding the `xgen` package: a git checkout's root when run from source.
SOURCE_ROOT = Path(__file__).resolve().parents[1]
# What a run executes, relative to SOURCE_ROOT; uncommitted changes elsewhere do not make it dirty.
SOURCE_PATHS = ("xgen", "conf")
MAX_LISTED = 50


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"git {args[0]} failed")
    return done.stdout.rstrip()


def source(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """The commit xgen runs from and whether the code a run executes (`xgen/`, `conf/`) has
    uncommitted changes, new files included (data, docs and tests do not count), or why that
    is unknown."""
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel")).resolve()
        # A virtualenv inside some other repository: that repository's commit is not xgen's.
        if top != root.resolve():
            return {"commit": None, "reason": f"xgen is installed at {root}, not a git checkout's root"}
        status = _git(root, "status", "--porcelain", "--", *SOURCE_PATHS)
        changed = [line[3:] for line in status.splitlines()]
        return {"commit": _git(root, "rev-parse", "HEAD"), "dirty": bool(changed), "changed": changed[:MAX_LISTED]}
    except FileNotFoundError:
        return {"commit": None, "reason": "git is not installed"}
    except (RuntimeError, subprocess.TimeoutExpired) as ex:
        return {"commit": None, "reason": f"not a git checkout ({ex})"}


def packages(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None: not installed), and Python's."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def devices() -> dict[str, Any]:
    """What JAX runs on: platform, device count and kind, processes. Starts JAX."""
    try:
        import jax

        found = jax.devices()
        kinds = sorted({d.device_kind for d in found})
        return {
            "platform": found[0].platform,
            "count": len(found),
            "kind": kinds[0] if len(kinds) == 1 else kinds,
            "processes": jax.process_count(),
        }
    except Exception as ex:  # noqa: BLE001 - a backend that does not start is the run's error to report, not this file's
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        return {"error": first}


def collect(uses_devices: bool, task: str) -> dict[str, Any]:
    """The whole record; devices only where the task runs on them (so JAX is not started for
    tasks that never touch it, and a TPU pod config compiled from a laptop is not probed)."""
    return {
        "source": source(),
        "packages": packages(),
        "devices": devices() if uses_devices else {"reason": f"task={task} runs on no devices"},
    }


def write(run_dir: Path, uses_devices: bool, task: str) -> dict[str, Any]:
    """Write provenance.json into `run_dir` (only process 0 of a multi-host job); returns it."""
    record = collect(uses_devices, task)
    if uses_devices and "error" not in record["devices"]:
        import jax

        if jax.process_index() != 0:
            return record
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def read(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's provenance, or None for a run written before it existed."""
    path = run_dir / FILE
    return json.loads(path.read_text()) if path.exists() else None
