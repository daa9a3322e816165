"""When to save a checkpoint: every `trainer.checkpoint_every` steps, and whenever
`trainer.checkpoint_minutes` have passed since the last save.

A step count is the same on every host; a clock is not. Hosts that disagreed on the step to
save would hang in orbax's collective save or write a torn one, so on several processes the
time-based decision is made on process 0's clock alone and shared through JAX's
coordination service (a key per decision: process 0 writes it, the others wait for it), as
orbax's own `ContinuousCheckpointingPolicy` does. That is a host-side round trip per step,
never a device collective: the step pipeline keeps running ahead."""

from __future__ import annotations

import time
from typing import Callable

import jax

_TIMEOUT_MS = 30 * 60 * 1000  # a peer that never answers is the watchdog's and the heartbeat's to catch


def _client():
    from jax._src.distributed import global_state  # the coordination service's client (orbax uses it the same way)

    return global_state.client


class SaveCadence:
    """`due(step)`, called once after every step on every process, says whether to save there;
    `saved()` restarts the clock. The clock starts when the cadence is made (after a restore)."""

    def __init__(self, every_steps: int, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.every, self.seconds, self.clock = every_steps, minutes * 60.0, clock
        self.shared = self.seconds > 0 and jax.process_count() > 1
        self.primary = jax.process_index() == 0
        self.client = _client() if self.shared else None
        self.last = clock()
        self.calls = 0

    def saved(self) -> None:
        self.last = self.clock()

    def _time_is_up(self) -> bool:
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def due(self, step: int) -> bool:
        by_steps = bool(self.every) and step % self.every == 0
        if not self.shared:
            return by_steps or self._time_is_up()
        # Every process makes the same calls in the same order, so the n-th decision has one
        # key for all; process 0 publishes, the others read (and also save on their step count).
        self.calls += 1
        key = f"xgen/checkpoint_minutes/{self.calls}"
        if self.primary:
            decision = self._time_is_up()
            self.client.key_value_set(key, "1" if decision else "0")
            if self.calls > 256:
                self.client.key_value_delete(f"xgen/checkpoint_minutes/{self.calls - 256}")
        else:
            decision = self.client.blocking_key_value_get(key, _TIMEOUT_MS) == "1"
        return by_steps or decision
