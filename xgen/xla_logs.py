"""XLA's C++ log threshold, which only the environment sets, before JAX starts.

XLA's C++ code writes to stderr itself, past Python's logging (so past run.log too); this
jaxlib reads TF_CPP_MIN_LOG_LEVEL when JAX starts: 0 everything, 1 warnings and up (JAX's
default), 2 errors and up, 3 fatal only. On a CPU its error lines are the constant-folding
alarms of a slow compile ("Constant folding an instruction is taking > 1s", a dozen lines
each), while real failures (out of memory, a bad program) still reach Python as exceptions
and FATAL checks still print. Accelerators and multi-process jobs keep JAX's default: there
C++ errors (NCCL, the coordination service, the TPU runtime) are how failures are explained.

libtpu is different: loaded off a TPU VM (task=plan describing a slice that is not here), it
prints its start-up complaints (no accelerator type, `E0000 ... unexpected worker hostname`)
to stderr before it has read any flag, so no log level reaches them (TF_CPP_MIN_LOG_LEVEL,
TPU_STDERR_LOG_LEVEL and TPU_MIN_LOG_LEVEL were tried with libtpu 0.0.42.1: each line still
printed). `native_stderr_to_run_log` moves file descriptor 2 itself while libtpu loads and
copies what was written into run.log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"
FATAL_ONLY = "3"


def quiet_cpu_compiler(platform: str, multi_process: bool) -> None:
    """Show only FATAL C++ lines on a single CPU process; a value the user set wins."""
    if platform == "cpu" and not multi_process and "jax" not in sys.modules:
        os.environ.setdefault(LEVEL_VAR, FATAL_ONLY)


@contextlib.contextmanager
def native_stderr_to_run_log(what: str, capture: Path) -> Iterator[None]:
    """What C++ code writes to stderr (file descriptor 2) inside the block goes to run.log (the
    `xgen.file_only` logger), as one record headed `what`, instead of the console. The lines
    are collected in the file `capture`, removed once copied: if the process dies inside the
    block (a FATAL check), they stay there. If the block raises they are printed to the
    console as well, since they may say why. Python's own writes to sys.stderr inside the
    block are captured too, so keep it to the native call."""
    from xgen.console import FILE_ONLY

    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    try:
        with open(capture, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            except BaseException:
                failed = True
                raise
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        text = capture.read_bytes().decode(errors="replace").strip() if capture.exists() else ""
        if text:
            logging.getLogger(FILE_ONLY).info("%s wrote to stderr:\n%s", what, text)
            if failed:
                print(text, file=sys.stderr)
        capture.unlink(missing_ok=True)
