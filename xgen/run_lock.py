"""One writer per run directory: an exclusive lock on `<run dir>/.xgen.lock`.

Two processes on one run directory (the same command started twice, a requeued job while
the old one still runs) would each append and truncate the other's metrics and save over
each other's checkpoints; one of them exits 0 with a record that is missing steps. The lock
makes the second one refuse in one line, naming the holder's host and process id.

It is `flock(2)`, held for the life of the process that owns the run (`python -m xgen.run`
takes it before writing anything into the directory; `xgen.tasks.run_task` takes it for the
task when nobody has), so the operating system releases it when that process dies, however
it dies: a crashed or killed run never blocks its own restart. Of a multi-host run, process 0
holds it (it alone writes metrics, events and the run's records). flock works on local disks
and NFSv4; on a file system that ignores it (some FUSE mounts) the lock holds nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from xgen.config.errors import ConfigError

LOCK_FILE = ".xgen.lock"
_held: dict[str, int] = {}  # resolved run directory -> the open, locked file descriptor


class RunDirInUse(ConfigError):
    """Another live process writes to this run directory."""

    label = "refused"


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (it writes itself there once it holds it)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "a process that has not yet said who it is"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info['pid']} on host {info.get('host', '?')}, started {started}"


def hold(run_dir: Path) -> bool:
    """Take `run_dir`'s lock for the life of this process; False if this process already held
    it. Raises RunDirInUse (one line) if another process holds it, ConfigError if the
    directory cannot be written."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return False
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as ex:
        raise ConfigError(f"run directory {run_dir} cannot be written: {ex.strerror or ex}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirInUse(
            f"run directory {run_dir} is in use by another run ({holder}); wait for it to end, "
            "or choose another directory (hydra.run.dir=...)"
        ) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[key] = fd
    return True


def release(run_dir: Path) -> None:
    """Give the lock back (a process that runs several runs one after another: the tests)."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """The lock for the duration of a block; a lock this process already held stays held."""
    took = hold(run_dir)
    try:
        yield
    finally:
        if took:
            release(run_dir)
