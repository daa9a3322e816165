"""When a run stops early: SIGTERM (a preempted VM, a scheduler's time limit) or SIGINT
(Ctrl-C) ends it after the current step with a checkpoint.

One process: a Python handler sets a flag the loop reads between steps.

Several processes (a pod): every process must save the same step, or the collective save
hangs or tears, and the signal reaches the hosts at different steps (or one host only).
JAX's distributed runtime agrees on it: `jax.distributed.initialize` installs its own
SIGTERM notifier, which tells the coordination service; the service picks the step after
the furthest host's, and `reached_preemption_sync_point(step)` turns true on every process
at that same step. So no Python SIGTERM handler is installed there (it would replace the
notifier), and SIGINT is handed to the notifier as a SIGTERM to this process.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
    """`at(step)`, called once after every step, says whether to save and stop there;
    `signum` is the signal that stops the run (SIGTERM when another host was signalled)."""

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.raised, self._agreed, self._previous = 0, False, {}
        signums = (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in signums}

    def _handle(self, signum, frame) -> None:
        self.raised = signum
        if self.multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells the other hosts

    def at(self, step: int) -> bool:
        if not self.multi_process:
            return bool(self.raised)
        # Every step, on every process (the protocol counts on it); cheap until a notice.
        if not self._agreed and multihost_utils.reached_preemption_sync_point(step):
            self._agreed = True
        return self._agreed

    @property
    def signum(self) -> int:
        return self.raised or signal.SIGTERM

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
