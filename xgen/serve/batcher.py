"""The static scheduler: rows that arrive together run together, to the longest one's end.

The worker takes the rows that arrive within `batch_wait_ms` of the first (and everything
that queued while the previous batch ran), up to `max_batch` rows, and makes one
`engine.generate` call for the rows that generate, then one `engine.score` call for the
rows whose echoed text needs log-probabilities (after generating, so the scores cover the
generated tokens too). Each row keeps its own sampling settings, and streamed text goes to
its own job. `serve.scheduler=continuous` (continuous.py) is the default; this one stays
as the reference it is measured against (bench/serve.py) and for engines without slots.

Batches are padded with one-token rows to a power of two (at most `max_batch`): every new
batch size is a new XLA compilation (seconds on a CPU, much more for a 7B model), so this
bounds the shapes at log2(max_batch) + 1 per prompt bucket.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from xgen.generate import SamplingConfig
from xgen.serve.jobs import Row, ServerError
from xgen.serve.scheduling import Scheduler, padded_to_power_of_two

log = logging.getLogger(__name__)


class Batcher(Scheduler):
    kind = "static"

    def __init__(self, engine, max_batch: int = 8, batch_wait_ms: float = 5.0, *, max_queued_rows: int = 4096):
        self.wait_s = max(0.0, batch_wait_ms) / 1000
        super().__init__(engine, max_batch, max_queued_rows)
        self.count(batches=0, padding_rows=0, generate_calls=0, score_calls=0, failed_batches=0)

    def _fits(self, batch: list[Row], row: Row) -> bool:
        """Generating rows share one cache: the longest prompt plus the most new tokens."""
        gen = [r for r in (*batch, row) if r.settings.max_new_tokens > 0]
        if not gen:
            return True
        return max(len(r.prompt) for r in gen) + max(r.settings.max_new_tokens for r in gen) <= self.engine.max_len

    def _loop(self) -> None:
        while self.wait_for_work():
            deadline = time.monotonic() + self.wait_s
            with self._cond:  # wait a little for rows that arrive together
                while self._queued < self.max_batch and not self._stopping and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
            batch = self.take(self.max_batch, self._fits)
            if batch:
                self._run(batch)

    def _padded(self, rows: list[Any], pad: Any) -> list[Any]:
        return padded_to_power_of_two(rows, pad, self.max_batch)

    def _run(self, batch: list[Row]) -> None:
        eos, padding = self.engine.tokenizer.eos_id, 0
        gen, scoring = [r for r in batch if r.settings.max_new_tokens > 0], [r for r in batch if r.score]
        try:
            if gen:
                prompts = self._padded([r.prompt for r in gen], [eos])
                settings = self._padded([r.settings for r in gen], SamplingConfig(max_new_tokens=1))
                padding += len(prompts) - len(gen)

                def on_text(i: int, delta: str) -> None:
                    if i < len(gen):
                        gen[i].job.text(gen[i].index, delta)

                top = max(r.top_logprobs for r in gen)
                for row, completion in zip(gen, self.engine.generate(prompts, settings, on_text=on_text, logprobs=top)):
                    row.completion = completion
                self.produced(sum(len(r.completion.tokens) + r.completion.eos for r in gen))
            if scoring:
                sequences = self._padded([r.sequence(eos) for r in scoring], [eos])
                padding += len(sequences) - len(scoring)
                top = max(r.top_logprobs for r in scoring)
                for row, scored in zip(scoring, self.engine.score(sequences, top_logprobs=top)):
                    row.scored = scored
        except Exception as ex:  # noqa: BLE001 - a failed batch fails its jobs, never the worker
            log.exception("batch of %d rows failed", len(batch))
            self.count(failed_batches=1)
            error = ServerError(f"the model failed on this batch: {type(ex).__name__}: {ex}")
            for row in batch:
                self.finished(row, error)
            return
        self.count(batches=1, padding_rows=padding, score_calls=bool(scoring), generate_calls=bool(gen))
        for row in batch:
            self.finished(row)
