"""What the HTTP side and a scheduler exchange: a request's rows, and the events of its job.

A handler builds a `Job` of `Row`s and submits it to a scheduler (`Batcher` or
`ContinuousBatcher`); the scheduler's one worker thread fills each row's completion and
reports progress as events: ("text", index, delta), ("row", index), then ("end",) or
("error", ServerError). A handler either passes `on_event` (called on the worker thread,
so it must only hand the event over, e.g. to an event loop) or reads `events`, a queue
filled for streaming jobs, or just `wait()`s."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from xgen.generate import Completion, SamplingConfig, Scored


@dataclass(eq=False)
class Row:
    """One prompt's work. settings.max_new_tokens == 0: nothing to generate (echo only)."""

    prompt: list[int]
    settings: SamplingConfig
    score: bool = False  # score prompt + completion (echo with logprobs)
    top_logprobs: int = 0
    scored: Scored | None = None
    completion: Completion | None = None
    job: "Job | None" = field(default=None, repr=False)
    index: int = 0
    # What the scheduler keeps of a row it took out of its slot before it finished (tokens
    # generated, text streamed), so that the row resumes where it was (continuous.py).
    progress: object = field(default=None, repr=False)

    def sequence(self, eos: int) -> list[int]:
        """What `score` runs over: the prompt and what was generated, with the end-of-text
        token when generation ended on it (lm-evaluation-harness sends max_tokens=1 and
        drops the last echoed token, so that token must be there)."""
        c = self.completion
        if c is None:
            return self.prompt
        return self.prompt + c.tokens + ([eos] if c.eos else [])


class ServerError(Exception):
    """A batch failed (or the server closed) while this job waited; answered with `status`."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


Event = tuple


class Job:
    """One HTTP request's rows and the events its scheduler reports (see the module doc)."""

    def __init__(self, rows: list[Row], stream: bool = False, on_event: Callable[[Event], None] | None = None):
        self.rows = rows
        for i, row in enumerate(rows):
            row.job, row.index = self, i
        self.on_event = on_event
        self.events: queue.Queue | None = queue.Queue() if stream and on_event is None else None
        self.error: ServerError | None = None
        self.cancelled = False  # the client went away: rows not yet started are skipped, running ones retired
        self.paused = False  # a stream's client is not reading: its rows wait (Scheduler.pause)
        self._left = len(rows)
        self._done = threading.Event()
        self._lock = threading.Lock()

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
        elif self.events is not None:
            self.events.put(event)

    def text(self, index: int, delta: str) -> None:
        self._emit(("text", index, delta))

    def row_done(self, index: int) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._left -= 1
            last = self._left == 0
            if last:
                self._done.set()
        self._emit(("row", index))
        if last:
            self._emit(("end",))

    def fail(self, error: ServerError) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.error = error
            self._done.set()
        self._emit(("error", error))

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> list[Row]:
        if not self._done.wait(timeout):
            raise ServerError("timed out waiting for the model", 504)
        if self.error is not None:
            raise self.error
        return self.rows
