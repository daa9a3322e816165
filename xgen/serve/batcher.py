"""One worker thread owns the Engine and runs concurrent requests as shared batches.

The Engine is not thread-safe and a batch of B rows costs little more than one row on an
accelerator, so HTTP threads only enqueue rows and wait. The worker takes the rows that
arrive within `batch_wait_ms` of the first (and everything that queued while the previous
batch ran), up to `max_batch` rows, and makes one `engine.generate` call for the rows that
generate, then one `engine.score` call for the rows whose echoed text needs
log-probabilities (after generating, so the scores cover the generated tokens too). Each
row keeps its own sampling settings, and streamed text goes to its own job.

Batches are padded with one-token rows to a power of two (at most `max_batch`): every new
batch size is a new XLA compilation (seconds on a CPU, much more for a 7B model), so this
bounds the shapes at log2(max_batch) + 1 per prompt bucket.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from xgen.generate import Engine, SamplingConfig
from xgen.serve.jobs import Job, Row, ServerError

log = logging.getLogger(__name__)


class Batcher:
    """The worker thread; `counters()` reports batches and rows so far (what a test or
    /health reads to see that concurrent requests shared batches)."""

    def __init__(self, engine: Engine, max_batch: int = 8, batch_wait_ms: float = 5.0):
        self.engine, self.max_batch, self.wait_s = engine, max(1, max_batch), max(0.0, batch_wait_ms) / 1000
        self._queue: list[Row] = []
        self._cond = threading.Condition()
        self._closed = False
        names = ("batches", "rows", "padding_rows", "generate_calls", "score_calls", "failed_batches")
        self._counts = dict.fromkeys(names, 0)
        self._thread = threading.Thread(target=self._loop, name="xgen-batcher", daemon=True)
        self._thread.start()

    def counters(self) -> dict[str, int]:
        with self._cond:
            return dict(self._counts)

    def submit(self, job: Job) -> Job:
        """Queue a job's rows; rows with nothing to compute finish at once."""
        work = []
        for row in job.rows:
            (work if row.score or row.settings.max_new_tokens > 0 else []).append(row)
        with self._cond:
            if self._closed:
                raise ServerError("the server is shutting down", 503)
            self._queue.extend(work)
            self._cond.notify()
        for row in job.rows:
            if row not in work:
                job.row_done(row.index)
        return job

    def close(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail what is still queued, stop the thread."""
        with self._cond:
            self._closed = True
            pending, self._queue = self._queue, []
            self._cond.notify_all()
        for row in pending:
            row.job.fail(ServerError("the server is shutting down", 503))
        self._thread.join(timeout)

    # ---- worker ------------------------------------------------------------------------

    def _fits(self, batch: list[Row], row: Row) -> bool:
        """Generating rows share one cache: the longest prompt plus the most new tokens."""
        gen = [r for r in (*batch, row) if r.settings.max_new_tokens > 0]
        if not gen:
            return True
        return max(len(r.prompt) for r in gen) + max(r.settings.max_new_tokens for r in gen) <= self.engine.max_len

    def _collect(self) -> list[Row] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, rest = [], []
            for row in self._queue:
                if row.job.finished or row.job.cancelled:
                    continue
                if not rest and len(batch) < self.max_batch and self._fits(batch, row):
                    batch.append(row)
                else:
                    rest.append(row)  # keep arrival order: a row that does not fit leads the next batch
            self._queue = rest
            return batch

    def _loop(self) -> None:
        while (batch := self._collect()) is not None:
            if batch:
                self._run(batch)

    def _padded(self, rows: list[Any], pad: Any) -> list[Any]:
        size = 1
        while size < len(rows):
            size *= 2
        return rows + [pad] * (min(size, self.max_batch) - len(rows))

    def _run(self, batch: list[Row]) -> None:
        eos, padding = self.engine.tokenizer.eos_id, 0
        try:
            gen = [r for r in batch if r.settings.max_new_tokens > 0]
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
            scoring = [r for r in batch if r.score]
            if scoring:
                sequences = self._padded([r.sequence(eos) for r in scoring], [eos])
                padding += len(sequences) - len(scoring)
                top = max(r.top_logprobs for r in scoring)
                for row, scored in zip(scoring, self.engine.score(sequences, top_logprobs=top)):
                    row.scored = scored
        except Exception as ex:  # noqa: BLE001 - a failed batch fails its jobs, never the worker
            log.exception("batch of %d rows failed", len(batch))
            with self._cond:
                self._counts["failed_batches"] += 1
            for row in batch:
                row.job.fail(ServerError(f"the model failed on this batch: {type(ex).__name__}: {ex}"))
            return
        with self._cond:
            self._counts["batches"] += 1
            self._counts["rows"] += len(batch)
            self._counts["padding_rows"] += padding
            self._counts["score_calls"] += bool(scoring)
            self._counts["generate_calls"] += bool(gen)
        for row in batch:
            row.job.row_done(row.index)
