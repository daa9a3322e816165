"""Where a run's wall time went, across every attempt (restart) of the same run: goodput.

The log's MFU says how well the productive steps used the chips; a run that lasts weeks
also loses time outside them, and that is what this accounts for. Each attempt's wall time
(from its process start) is split into:

- `startup`: process start until the train step starts compiling (imports, the multi-host
  runtime, the data pipeline, the model's abstract state);
- `compile`: compiling the train step (ahead of time, and its memory check);
- `restore`: reading a checkpoint (at the start, or a rollback's);
- `productive`: the step loop, less the three below;
- `data_wait`: the loop blocked on the next batch;
- `checkpoint`: the loop blocked on saving (the asynchronous part overlaps steps and is not counted);
- `eval`: the held-out loss and benchmarks run in the loop (`trainer.eval_every`, `eval_tasks_every`);
- `lost`: steps trained by an earlier attempt after the checkpoint the run resumed from,
  which the next attempt trains again (moved out of that attempt's `productive`);
- `other`: anything else inside an attempt (the summary, logging's own time);

and the run's `idle` is the time between attempts: from the last record of an attempt that
died to the start of the next (the failure, its detection, the supervisor's backoff).
The categories add up to the wall time from the first attempt's start to the last record.

`goodput.json` is rewritten (atomically) at every log line and checkpoint by process 0; its
`step` is the newest finished step, which `python -m xgen.launch` reads to tell a failure
that repeats at one step from one that makes progress."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

CATEGORIES = ("startup", "compile", "restore", "productive", "data_wait", "checkpoint", "eval", "lost", "other", "idle")


def process_start_time() -> float:
    """This process's start (Unix seconds), from the kernel: the time before Python ran counts."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime since boot, field 22 of stat(5)
        uptime = float(Path("/proc/uptime").read_text().split()[0])  # to 10 ms (btime is whole seconds)
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()
_last_record = [0.0]  # when this process last closed an account (`Goodput.write`)


class Goodput:
    """This attempt's account, appended to the earlier attempts' in `<run_dir>/goodput.json`."""

    def __init__(self, run_dir: Path, primary: bool = True):
        self.path = run_dir / "goodput.json"
        self.primary = primary
        self.attempts = self._earlier() if primary else []
        # Several runs in one process (task=pretrain_all's stages, a notebook): each begins where
        # the previous one's account ended, not at the process's start.
        started = max(process_start_time(), _last_record[0], self.attempts[-1]["updated"] if self.attempts else 0.0)
        self.current = {"started": started, "updated": started, "resumed_from": None, "step": None,
                        "seconds": dict.fromkeys(CATEGORIES[:-1], 0.0)}  # fmt: skip
        self.attempts.append(self.current)
        self.current["seconds"]["startup"] = max(time.time() - started, 0.0)
        self.mark = time.time()  # the end of the last accounted interval
        self.inside = 0.0  # seconds since the mark already given to a category by `add`

    def _earlier(self) -> list[dict]:
        try:
            record = json.loads(self.path.read_text())
            attempts = record["attempts"]
            assert isinstance(attempts, list) and all("seconds" in a and "updated" in a for a in attempts)
            return attempts
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            log.warning("%s is unreadable: the time account starts again", self.path)
            return []

    def add(self, category: str, seconds: float) -> None:
        """`seconds` of the current interval were spent on `category` (not to be counted again
        by the next `since_mark`)."""
        seconds = max(seconds, 0.0)
        self.current["seconds"][category] = self.current["seconds"].get(category, 0.0) + seconds  # an older record lacks `eval`
        self.inside += seconds

    @contextlib.contextmanager
    def timing(self, category: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.add(category, time.time() - t0)

    def since_mark(self, category: str) -> None:
        """The time since the last `since_mark` (or the start) not already given to another
        category goes to `category`."""
        now = time.time()
        self.current["seconds"][category] += max(now - self.mark - self.inside, 0.0)
        self.mark, self.inside = now, 0.0

    def resumed(self, step: int) -> None:
        """This attempt starts at `step`: earlier attempts' steps after it are trained again."""
        self.current["resumed_from"] = self.current["step"] = step
        for attempt in self.attempts[:-1]:
            kept = attempt.get("kept_until", attempt.get("step"))
            first = attempt.get("resumed_from")
            if kept is None or first is None or step >= kept:
                continue
            redo = kept - max(step, first)
            trained = kept - first
            moved = attempt["seconds"]["productive"] * redo / trained if trained > 0 else 0.0
            attempt["seconds"]["productive"] -= moved
            attempt["seconds"]["lost"] += moved
            attempt["lost_steps"] = attempt.get("lost_steps", 0) + redo
            attempt["kept_until"] = max(step, first)

    def totals(self) -> dict:
        """Seconds and shares per category over all attempts, the wall time and lost steps."""
        seconds = dict.fromkeys(CATEGORIES, 0.0)
        previous = None
        for attempt in self.attempts:
            for key, value in attempt["seconds"].items():
                seconds[key] += value
            if previous is not None:
                seconds["idle"] += max(attempt["started"] - previous["updated"], 0.0)
            previous = attempt
        wall = self.attempts[-1]["updated"] - self.attempts[0]["started"]
        return {
            "wall_s": wall,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "share": {k: round(v / wall, 4) if wall > 0 else 0.0 for k, v in seconds.items()},
            "lost_steps": sum(a.get("lost_steps", 0) for a in self.attempts),
        }

    def write(self, step: int | None = None) -> dict:
        """Close the attempt's account at now (the remainder is `other`) and rewrite the file."""
        now = _last_record[0] = time.time()
        if step is not None:
            self.current["step"] = step
        self.current["updated"] = now
        accounted = sum(v for k, v in self.current["seconds"].items() if k != "other")
        self.current["seconds"]["other"] = max(now - self.current["started"] - accounted, 0.0)
        totals = self.totals()
        if self.primary:
            newest = max((a["step"] for a in self.attempts if a.get("step") is not None), default=None)
            record = {"step": newest, "attempts_count": len(self.attempts), **totals, "attempts": self.attempts}
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(partial, self.path)
        return totals


def summary_line(totals: dict, attempts: int) -> str:
    """The log's goodput line: the productive share, then each other share that is not zero."""
    share = totals["share"]
    wall = totals["wall_s"]
    rest = ", ".join(f"{k} {share[k]:.1%}" for k in CATEGORIES if k != "productive" and share[k] >= 0.0005)
    clock = f"{int(wall // 3600)}:{int(wall % 3600 // 60):02d}:{int(wall % 60):02d}"
    lost = f", {totals['lost_steps']} steps redone" if totals["lost_steps"] else ""
    return f"goodput {share['productive']:.1%} productive over {clock} in {attempts} attempt(s){lost} ({rest})"
