"""`trainer.profile_steps=[first, last]`: a `jax.profiler` trace of those steps.

The trace goes to `<run dir>/profile/` in the layout TensorBoard's profile plugin reads
(`plugins/profile/<time>/<host>.xplane.pb`) and, beside it, a Perfetto trace
(`perfetto_trace.json.gz`, for ui.perfetto.dev), as MaxText's `profiler` option and
torchtitan's `profiling.enable_profiling` do. Only process 0 traces (its steps are every
host's steps); the last traced step is waited on before the trace stops, so the trace
holds the device work of every step it names, not only their dispatch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)


class Profiler:
    def __init__(self, steps: list[int], out: Path):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.out, self.active = out, False

    def before(self, step: int) -> None:
        """Called before step `step` runs."""
        if step == self.first and not self.active and jax.process_index() == 0:  # a rollback may return here
            self.out.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.out), create_perfetto_trace=True)
            self.active = True
            log.info("profiling steps %d-%d into %s", self.first, self.last, self.out)

    def after(self, step: int, state) -> None:
        """Called after step `step`; `state` is waited on before the trace stops."""
        if self.active and step >= self.last:
            jax.block_until_ready(state)
            self.close()
            log.info("profile of steps %d-%d written to %s (TensorBoard's profile plugin, or Perfetto)", self.first, step, self.out)

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
