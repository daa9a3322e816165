"""What reaches the console: xgen's lines and one line per real error; tracebacks of errors a
library logs and recovers from, or of exceptions Python can only ignore, go to run.log.

conf/config.yaml wires these into Hydra's job logging: absl's errors (orbax's background
threads) reach the console as their first line through `FirstLineFormatter`, with the full
record in run.log; `xgen.file_only` is a logger that writes to run.log alone. XLA's C++
lines bypass Python's logging: see xgen/xla_logs.py.
"""

from __future__ import annotations

import logging
import os
import sys

FILE_ONLY = "xgen.file_only"  # conf/config.yaml: handlers [file], propagate false


class FirstLineFormatter(logging.Formatter):
    """A record's first line, without its traceback (kept in run.log by the file handler):
    a save that fails on a full disk is otherwise a hundred lines from each of orbax's
    threads, and the one line xgen prints for it is lost among them."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        first = record.getMessage().splitlines()[0] if record.getMessage() else ""
        record.msg, record.args = first, None
        return super().format(record)


def unraisable_to_run_log(unraisable) -> None:
    """sys.unraisablehook: exceptions Python can only ignore (raised in a finalizer, or in
    orbax's and tensorstore's late callbacks into a closed event loop after a checkpoint was
    refused or fell back: hundreds of lines) go to run.log with their traceback."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    try:
        exc = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        logging.getLogger(FILE_ONLY).warning("exception ignored in %r", unraisable.object, exc_info=exc)
    except Exception:  # noqa: BLE001 - the interpreter is shutting down: nothing can be written
        pass


def exit_now(code: int) -> None:
    """Exit without waiting for other threads, the logs flushed first: after a refused save,
    orbax's background threads wait minutes for a directory that will never appear (and
    print their own tracebacks as they are collected)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class heartbeat:
    """`with heartbeat("compiling the train step"):` logs "compiling the train step: 10 s ..."
    after `every_s` seconds, then after waits doubling up to a minute (at about 10, 30, 70, 130, 190 s,
    ...) until the block ends, so that a compile of minutes (a 7B step for a TPU pod, the
    first step on a loaded host) is never a silent console, nor a wall of lines. Nothing is
    logged for a block shorter than `every_s`."""

    def __init__(self, what: str, every_s: float = 10.0, logger: logging.Logger | None = None):
        import threading

        self.what, self.every_s = what, every_s
        self.logger = logger or logging.getLogger("xgen")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="xgen-heartbeat", daemon=True)

    def _beat(self) -> None:
        import time

        t0, wait = time.monotonic(), self.every_s
        while not self._done.wait(wait):
            self.logger.info("%s: %.0f s ...", self.what, time.monotonic() - t0)
            wait = min(2 * wait, 60.0)

    def __enter__(self) -> "heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
