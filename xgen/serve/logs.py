"""Repeated warnings become one line per interval, with a count of those left out.

A flood of bad connections (a scanner, a client stuck in a retry loop, a process out of file
descriptors) made every one of them a warning, or a traceback from asyncio's accept loop:
the server of issue 31 wrote 490 MB of log in two minutes. `REPEATS`, a filter on the
serving loggers (uvicorn's, asyncio's and xgen.serve's), lets the first record of each
message template (logger, level, unformatted message) through per `interval_s`
(`serve.log_repeat_s`), counts the rest, and reports the count in one line once the interval
is over (when the message comes again, or from `flush`, which the server calls every
interval and when it closes). Records below WARNING (the one line per request) pass as
they are. One filter serves the process: loggers are process-wide, and its counts are
those of every server in it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

LOGGERS = (
    "uvicorn", "uvicorn.error", "asyncio", "xgen.serve.app", "xgen.serve.server", "xgen.serve.limits",
    "xgen.serve.scheduling", "xgen.serve.continuous", "xgen.serve.batcher",
)  # fmt: skip
HTTP_LOGGER = "xgen.serve.http"  # the name uvicorn's own lines are logged under (see rename_uvicorn)
SUMMARY = "xgen_repeat_summary"  # the attribute that marks a filter's own summary line
MAX_KEYS = 4096  # distinct templates remembered; beyond this, finished intervals are forgotten


@dataclass
class _Seen:
    since: float
    logger: str
    level: int
    template: str
    left_out: int = 0


class RepeatFilter(logging.Filter):
    """Per (logger, level, template): the first record of each interval passes, the rest are
    counted and summarised in one line when the interval is over."""

    def __init__(self, interval_s: float = 10.0):
        super().__init__()
        self.interval_s = interval_s
        self.left_out = 0  # records not logged since the process started (xgen_suppressed_log_lines_total)
        self._seen: dict[tuple[str, int, str], _Seen] = {}
        self._lock = threading.Lock()

    def install(self, interval_s: float) -> float:
        """Filter the serving loggers (once per process) with this interval; returns the
        interval it replaces (a server restores it when it closes)."""
        previous, self.interval_s = self.interval_s, interval_s
        for name in LOGGERS:
            logging.getLogger(name).addFilter(self)  # a no-op when it is there already
        return previous

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, SUMMARY, False) or self.interval_s <= 0:
            return True
        key, now = (record.name, record.levelno, str(record.msg)), time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen.since < self.interval_s:
                seen.left_out += 1
                self.left_out += 1
                return False
            if len(self._seen) >= MAX_KEYS:
                self._forget(now)
            self._seen[key] = _Seen(now, record.name, record.levelno, key[2])
        if seen is not None and seen.left_out:
            _summarise(seen, now)
        return True

    def flush(self, everything: bool = False) -> None:
        """Report the counts of intervals that are over (all of them with `everything`)."""
        now, due = time.monotonic(), []
        with self._lock:
            for seen in self._seen.values():
                if seen.left_out and (everything or now - seen.since >= self.interval_s):
                    due.append(_Seen(seen.since, seen.logger, seen.level, seen.template, seen.left_out))
                    seen.since, seen.left_out = now, 0  # the summary is this interval's line
            self._forget(now)
        for seen in due:
            _summarise(seen, now)

    def _forget(self, now: float) -> None:
        """Drop templates whose interval is over and left nothing out (under the lock)."""
        for key in [k for k, s in self._seen.items() if not s.left_out and now - s.since >= self.interval_s]:
            del self._seen[key]


def _summarise(seen: _Seen, now: float) -> None:
    logging.getLogger(seen.logger).log(
        seen.level, "%d more lines like this one in the last %.0f s were not logged (serve.log_repeat_s): %s",
        seen.left_out, now - seen.since, seen.template[:300], extra={SUMMARY: True},
    )  # fmt: skip


class _Rename(logging.Filter):
    """Renames the records of the logger it filters (their level and text unchanged)."""

    def __init__(self, name: str):
        super().__init__()
        self.new_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = self.new_name
        return True


_UVICORN_NAMES = _Rename(HTTP_LOGGER)


def rename_uvicorn() -> None:
    """uvicorn logs every line of its own, "Started server process" and "Shutting down"
    included, as `uvicorn.error` (its name for whatever is not an access line), so a healthy
    server's log read as errors. Its records come out as `xgen.serve.http` instead, at their
    own level (once per process; before the rate limit's filter, which then counts them under
    that name)."""
    logger = logging.getLogger("uvicorn.error")
    if _UVICORN_NAMES not in logger.filters:
        logger.filters.insert(0, _UVICORN_NAMES)


REPEATS = RepeatFilter()
