"""What every scheduler shares: the queue, admission, shutdown and the operators' counters.

A scheduler owns the Engine (which is not thread-safe) on one worker thread; HTTP handlers
only `submit` jobs. Rows wait in one queue per request and are taken round-robin over
requests (`take`), so a request of 2,000 prompts shares the model with a request of one
instead of running ahead of it. A scheduler that keeps rows in slots (continuous.py) also
passes what each request holds: requests under their share (`max_request_share` of
`max_batch`) are served first, so a request that arrives while another fills every slot
gets one of them. A job can be paused (its stream's client is not reading): its rows are
not taken until it resumes. `close(grace_s)` stops admitting new requests, lets what is
queued and running finish for up to `grace_s` seconds, then fails the rest (503): a
stream then ends with an error event and `data: [DONE]`, never mid-air.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from xgen.serve.jobs import Job, Row, ServerError

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # tokens/s in counters() is over this many recent seconds
COUNTS = ("requests", "rows", "generated_tokens", "prompt_tokens", "failed_rows", "rejected_requests", "paused_streams",
          "dropped_rows")  # fmt: skip


class Scheduler:
    """The base of `Batcher` (static) and `ContinuousBatcher`; subclasses write `_loop`,
    which calls `take` for work and `finished`/`produced` as rows progress."""

    kind = ""

    def __init__(self, engine, max_batch: int = 8, max_queued_rows: int = 4096, max_request_share: float = 0.5):
        self.engine, self.max_batch, self.max_queued_rows = engine, max(1, max_batch), max(1, max_queued_rows)
        self.max_request_share = max_request_share
        self._queues: collections.OrderedDict[Job, collections.deque[Row]] = collections.OrderedDict()
        self._queued = 0
        self._running: set[Row] = set()
        self._cond = threading.Condition()
        self._accepting, self._stopping = True, False
        self._counts = dict.fromkeys(COUNTS, 0)
        self._extra: dict[str, int] = {}
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run_loop, name=f"xgen-{self.kind}-scheduler", daemon=True)
        self._thread.start()

    # ---- the HTTP side -----------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue a job's rows (503 while shutting down, 429 when the queue is full); rows with
        nothing to compute finish at once."""
        work = [row for row in job.rows if row.score or row.settings.max_new_tokens > 0]
        with self._cond:
            if not self._accepting:
                self._counts["rejected_requests"] += 1
                raise ServerError("the server is shutting down", 503)
            if self._queued + len(work) > self.max_queued_rows:
                self._counts["rejected_requests"] += 1
                raise ServerError(
                    f"the server's queue is full ({self._queued} rows wait, at most {self.max_queued_rows}); retry later",
                    429,
                )
            self._counts["requests"] += 1
            if work:
                self._queues[job] = collections.deque(work)
                self._queued += len(work)
            self._cond.notify_all()
        for row in job.rows:
            if not (row.score or row.settings.max_new_tokens > 0):
                job.row_done(row.index)
        return job

    def pause(self, job: Job) -> None:
        """Hold a job's rows (its stream's client is not reading): queued rows are not taken,
        and a scheduler with slots stops computing its running rows and gives their slots to
        waiting requests (continuous.py)."""
        with self._cond:
            if not job.paused:
                job.paused = True
                self._counts["paused_streams"] += 1

    def resume(self, job: Job) -> None:
        with self._cond:
            job.paused = False
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: its queued rows are dropped and its running rows retired."""
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def close(self, grace_s: float = 0.0, timeout: float = 30.0) -> None:
        """Stop admitting requests; give queued and running rows `grace_s` seconds; fail the
        rest with 503; stop the worker."""
        deadline = time.monotonic() + max(0.0, grace_s)
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            while (self._queued or self._running) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(min(left, 0.1))
            self._stopping = True
            pending = [row for rows in self._queues.values() for row in rows]
            self._queues.clear()
            self._queued = 0
            self._cond.notify_all()
        if pending:
            log.warning("shutting down: %d queued rows were not started (answered 503)", len(pending))
        for row in pending:
            row.job.fail(ServerError("the server is shutting down", 503))
        self._thread.join(timeout)
        with self._cond:
            running, self._running = list(self._running), set()
        for row in running:
            row.job.fail(ServerError("the server shut down before this row finished", 503))

    def counters(self) -> dict[str, float | str]:
        """Totals since start, what waits and runs now, and tokens/s over the last 10 s."""
        now = time.monotonic()
        with self._cond:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            window = min(RATE_WINDOW_S, now - self._started) or 1.0
            rate = sum(n for _, n in self._recent) / window
            return {
                "scheduler": self.kind, **self._counts, **self._extra, "queued_rows": self._queued, "queued_requests": len(self._queues),
                "running_rows": len(self._running), "tokens_per_s": round(rate, 2), "max_batch": self.max_batch,
                "max_request_rows": self.share_rows,
            }  # fmt: skip

    @property
    def share_rows(self) -> int:
        """The slots one request keeps while others wait: max_request_share of max_batch, at least 1."""
        return max(1, int(self.max_request_share * self.max_batch + 1e-9))

    # ---- the worker side ---------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - a dead worker must not leave requests waiting forever
            log.exception("the %s scheduler stopped", self.kind)
            with self._cond:
                self._accepting, self._stopping = False, True
                rows = [row for rows in self._queues.values() for row in rows] + list(self._running)
                self._queues.clear()
                self._queued, self._running = 0, set()
            for row in rows:
                row.job.fail(ServerError("the model's scheduler failed; see the server log"))

    def count(self, **increments: int) -> None:
        """Scheduler-specific counters (batches, padding rows, ...), reported by counters()."""
        with self._cond:
            for key, n in increments.items():
                self._extra[key] = self._extra.get(key, 0) + n

    def wait_for_work(self) -> bool:
        """Block until there is something to do (a row to take, a row to run or retire);
        False once the worker must stop. Rows of paused jobs alone are nothing to do."""
        with self._cond:
            while not self._stopping:
                self._drop_dead()
                if any(not job.paused for job in self._queues) or any(
                    not (row.job.paused and not row.job.cancelled and not row.job.finished) for row in self._running
                ):
                    return True
                self._cond.wait()
            return False

    def _drop_dead(self) -> None:
        """Forget the queued rows of cancelled and failed jobs (under the lock), counted."""
        for job in [job for job in self._queues if job.finished or job.cancelled]:
            dropped = len(self._queues.pop(job))
            self._queued -= dropped
            self._counts["dropped_rows"] += dropped

    def waiting_jobs(self) -> list[Job]:
        """Jobs with rows that could be taken now (not paused, not cancelled), in queue order."""
        with self._cond:
            return [job for job in self._queues if not (job.paused or job.cancelled or job.finished)]

    def take(self, limit: int, fits=None, held: dict | None = None) -> list[Row]:
        """Up to `limit` queued rows, one per request in turn (round-robin), skipping paused
        jobs and dropping cancelled or failed ones. `fits(taken, row)`: whether `row` may
        join; the first row that does not ends the taking (it leads next time, arrival order
        is kept). `held` (job -> rows it runs now): requests under their share
        (`share_rows`) are served first, the rest only from slots still free after them."""
        taken: list[Row] = []
        with self._cond:
            self._drop_dead()
            counts = dict(held or {})
            for fair in (True, False) if held is not None else (False,):
                more = True
                while more and len(taken) < limit:
                    more = False
                    for job in list(self._queues):
                        if len(taken) >= limit:
                            break
                        if job.paused or (fair and counts.get(job, 0) >= self.share_rows):
                            continue
                        rows = self._queues[job]
                        if fits is not None and not fits(taken, rows[0]):
                            self._running.update(taken)
                            return taken
                        taken.append(rows.popleft())
                        self._queued -= 1
                        counts[job] = counts.get(job, 0) + 1
                        more = True
                        if rows:
                            self._queues.move_to_end(job)  # the next row comes from the next request
                        else:
                            del self._queues[job]
            self._running.update(taken)
            return taken

    def put_back(self, row: Row) -> None:
        """A running row leaves its slot unfinished (`row.progress` keeps what it generated):
        it waits at the head of its request's queue, counted as queued, not as a finished row."""
        if row.job.finished or row.job.cancelled:
            return self.finished(row)
        with self._cond:
            self._running.discard(row)
            rows = self._queues.get(row.job)
            if rows is None:
                rows = self._queues[row.job] = collections.deque()
            rows.appendleft(row)
            self._queued += 1
            self._cond.notify_all()

    def produced(self, tokens: int) -> None:
        """`tokens` new tokens were generated (tokens/s and the total)."""
        with self._cond:
            self._counts["generated_tokens"] += tokens
            self._recent.append((time.monotonic(), tokens))

    def finished(self, row: Row, error: ServerError | None = None) -> None:
        """A row is done (or failed): tell its job, free its place."""
        with self._cond:
            self._running.discard(row)
            self._counts["rows"] += 1
            self._counts["prompt_tokens"] += len(row.prompt)
            self._counts["failed_rows"] += error is not None
            self._cond.notify_all()
        if error is not None:
            row.job.fail(error)
        else:
            row.job.row_done(row.index)

    def _loop(self) -> None:
        raise NotImplementedError


def padded_to_power_of_two(items: list, pad, cap: int) -> list:
    """`items` and copies of `pad` up to the next power of two (at most `cap`): each new batch
    size is an XLA compilation, so this bounds them at log2(cap) + 1."""
    size = 1
    while size < len(items):
        size *= 2
    return items + [pad] * (min(size, cap) - len(items))


def make_scheduler(engine, scheduler: str = "continuous", *, max_batch: int = 8, prefill_chunk: int = 128,
                   batch_wait_ms: float = 5.0, max_queued_rows: int = 4096, max_request_share: float = 0.5) -> Scheduler:  # fmt: skip
    """The scheduler `serve.scheduler` names (docs/serving.md compares the two)."""
    if scheduler == "static":
        from xgen.serve.batcher import Batcher

        return Batcher(engine, max_batch, batch_wait_ms, max_queued_rows=max_queued_rows)
    if scheduler == "continuous":
        from xgen.serve.continuous import ContinuousBatcher

        return ContinuousBatcher(engine, max_batch, prefill_chunk=prefill_chunk, max_queued_rows=max_queued_rows,
                                 max_request_share=max_request_share)  # fmt: skip
    raise ValueError(f"serve.scheduler={scheduler!r}: use continuous or static")
