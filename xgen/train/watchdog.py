"""The hang watchdog: a training run that stops finishing steps must end, not wait forever.

A dead peer in a collective, a read from storage that never returns, a deadlock in a data
thread: each leaves the process alive and idle, so neither the scheduler nor a supervisor
sees anything wrong. The watchdog is a thread that the step loop beats after every step;
when no beat comes within `trainer.step_timeout_minutes` it writes every thread's stack to
the run log (where the hang is), says so in one line, and ends the process with exit code
124 (`xgen.exits.HANG`) without running any cleanup that could hang too. A supervisor
(`python -m xgen.launch`) then restarts the run from its last checkpoint.

It is armed from the restore on (a restore waits on every host and on storage, and hangs
with them); start-up and the ahead-of-time compile (minutes for a large model) are not
watched, nor is a compile after the restore."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from pathlib import Path

from xgen import exits

log = logging.getLogger(__name__)


def run_log_path(run_dir: Path) -> Path:
    """The file the root logger writes (Hydra's `<run_dir>/run.log`), else `<run_dir>/run.log`."""
    for handler in logging.getLogger().handlers:
        name = getattr(handler, "baseFilename", None)
        if name:
            return Path(name)
    return run_dir / "run.log"


class Watchdog:
    def __init__(self, minutes: float, run_dir: Path):
        self.timeout = minutes * 60.0
        self.log_path = run_log_path(run_dir)
        self.step = None
        self.last = time.monotonic()
        self.paused = 0
        self._stop = threading.Event()
        self._thread = None
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="xgen-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    @contextlib.contextmanager
    def paused_for(self):
        """Not a step: a compile may take longer than one."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1
            self.last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout / 10)):
            if not self.paused and time.monotonic() - self.last > self.timeout:
                self._fire()

    def _fire(self) -> None:
        waited = time.monotonic() - self.last
        after = f"after step {self.step}" if self.step is not None else "since the restore began"
        line = (
            f"xgen: hang: no step finished in {waited / 60:.1f} minutes {after} "
            f"(trainer.step_timeout_minutes={self.timeout / 60:g}); every thread's stack is in {self.log_path}; exit {exits.HANG}"
        )
        try:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")
                fh.flush()
                faulthandler.dump_traceback(file=fh, all_threads=True)
        except OSError:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(line, file=sys.stderr, flush=True)
        os._exit(exits.HANG)  # no cleanup: whatever hangs would hang it too
