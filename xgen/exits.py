"""What each exit code of `python -m xgen.run` and `python -m xgen.launch` means: the one
table the trainer, the supervisor, the launchers and docs/launching.md read.

A supervisor decides from the code alone whether a restart can help: a config or input
mistake (2) will fail the same way again, a hang (124) or a crash (1, or death by a signal)
may not, and a stop on SIGTERM/SIGINT (143/130) saved a checkpoint first."""

from __future__ import annotations

import signal

OK = 0
FAILED = 1  # an unexpected error (a traceback in the log)
CONFIG = 2  # a config, input or environment mistake, said in one line: restarting cannot help
GAVE_UP = 3  # the supervisor stopped restarting: the same failure repeated, or --retries spent
HANG = 124  # the watchdog: no step finished within trainer.step_timeout_minutes (as timeout(1))
SIGINT = 128 + signal.SIGINT  # 130: Ctrl-C; a checkpoint was saved after the current step
SIGTERM = 128 + signal.SIGTERM  # 143: preempted or asked to stop; a checkpoint was saved

MEANING = {
    OK: "done: the run reached trainer.steps (or the task finished)",
    FAILED: "failed: an unexpected error; the traceback is in the log",
    CONFIG: "refused: a config, input or environment mistake, said in one line (a restart cannot help)",
    GAVE_UP: "the supervisor gave up: the same failure at the same step repeated, or --retries were spent",
    HANG: "hang: no step finished within trainer.step_timeout_minutes; every thread's stack is in the run log",
    SIGINT: "interrupted (Ctrl-C): a checkpoint was saved after the current step",
    SIGTERM: "stopped by SIGTERM (preemption, a time limit): a checkpoint was saved after the current step",
}


def describe(code: int) -> str:
    """One phrase for an exit code; a negative one (Popen's returncode for death by a signal)
    is told as the signal (kill -9: SIGKILL, nothing saved since the last checkpoint)."""
    if code in MEANING:
        return MEANING[code]
    signum = -code if code < 0 else code - 128 if code > 128 else 0
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}: nothing saved since the last checkpoint"
    return f"failed with exit code {code}"
