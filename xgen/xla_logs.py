"""XLA's C++ log threshold, which only the environment sets, before JAX starts.

XLA's C++ code writes to stderr itself, past Python's logging (so past run.log too); this
jaxlib reads TF_CPP_MIN_LOG_LEVEL when JAX starts: 0 everything, 1 warnings and up (JAX's
default), 2 errors and up, 3 fatal only. On a CPU its error lines are the constant-folding
alarms of a slow compile ("Constant folding an instruction is taking > 1s", a dozen lines
each), while real failures (out of memory, a bad program) still reach Python as exceptions
and FATAL checks still print. Accelerators and multi-process jobs keep JAX's default: there
C++ errors (NCCL, the coordination service, the TPU runtime) are how failures are explained.
"""

from __future__ import annotations

import os
import sys

LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"
FATAL_ONLY = "3"


def quiet_cpu_compiler(platform: str, multi_process: bool) -> None:
    """Show only FATAL C++ lines on a single CPU process; a value the user set wins."""
    if platform == "cpu" and not multi_process and "jax" not in sys.modules:
        os.environ.setdefault(LEVEL_VAR, FATAL_ONLY)
