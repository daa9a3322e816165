"""`python -m xgen.launch [options] -- <xgen.run overrides>`: keep a run of weeks alive.

A long run meets crashes, hangs, kill -9s and preemptions; each costs only the work since the
last checkpoint if someone starts the same command again on the same run directory. This
supervisor is that someone: it runs `python -m xgen.run` as a child and restarts it after a
failure, with backoff, until the run finishes, a restart cannot help (exit 2), the same
failure repeats at the same step, `--retries` are spent, or it is asked to stop (SIGTERM,
Ctrl-C: passed on to the run, which saves a checkpoint, and never restarted).

It decides from the child's exit code (the table in xgen/exits.py) and from the step in
`<run_dir>/goodput.json` (the newest step the run finished, across attempts), and it pins the
run directory, which Hydra would otherwise time-stamp anew at every start. It imports the
standard library and xgen.exits only: it must not share the fate of the process that starts
JAX, nor wait for its imports. docs/launching.md, "Keeping a long run alive", has the rules.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from xgen import exits

TAIL_LINES = 50  # the child's last lines kept to name a failure's cause
RUN_DIR = re.compile(r"^\+{0,2}hydra\.run\.dir=(.*)$")
TASK = re.compile(r"^\+{0,2}task=(\w+)$")
MULTIRUN = re.compile(r"^(-m|--multirun|\+{0,2}hydra\.mode=MULTIRUN)$")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


class UsageError(Exception):
    """A bad option or override: one line on stderr and exit 2, like xgen.run's refusals."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage too: one line is enough
        raise UsageError(message)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The supervisor's options, then the overrides: everything after `--` verbatim (and any
    `key=value` before it), so that xgen.run's own flags (`--cfg`) never reach argparse."""
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = _Parser(
        prog="python -m xgen.launch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run `python -m xgen.run <overrides>` and restart it after a failure, with backoff,\n"
        "until it finishes or a give-up rule fires (docs/launching.md, 'Keeping a long run alive').",
        epilog="example:\n  python -m xgen.launch --retries 50 -- experiment=xgen_7b_s1_2k hydra.run.dir=/mnt/runs/s1\n"
        "exit codes: xgen.run's (0 done, 2 refused, 143/130 stopped by a signal), or 3: gave up",
    )
    p.add_argument("--retries", type=int, default=100, help="restarts allowed in all (default 100), then exit 3")
    p.add_argument("--backoff", type=float, default=10.0, help="seconds before the first restart (default 10)")
    p.add_argument("--max-backoff", type=float, default=600.0, help="cap of the doubling backoff (default 600)")
    p.add_argument(
        "--same-failure-limit", type=int, default=3,
        help="give up (exit 3) when the same exit code at the same step repeats this many times in a row (default 3; 0: never)",
    )  # fmt: skip
    p.add_argument(
        "--silence-minutes", type=float, default=60.0,
        help="kill and restart a run that prints nothing and leaves goodput.json alone this long (default 60; 0: never)",
    )  # fmt: skip
    p.add_argument(
        "--program", help="for tests and debugging: the command to run instead of `python -m xgen.run`, split like a shell's"
    )
    p.add_argument("overrides", nargs="*", help="xgen.run overrides (put them after --)")
    opts = p.parse_args(own)
    for name in ("retries", "backoff", "max_backoff", "same_failure_limit", "silence_minutes"):
        if getattr(opts, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(opts, name)}")
    opts.program = shlex.split(opts.program) if opts.program is not None else [sys.executable, "-m", "xgen.run"]
    if not opts.program:
        raise UsageError("--program is empty")
    overrides = [*opts.overrides, *rest]
    if any(MULTIRUN.match(o) for o in overrides):
        raise UsageError("multirun (-m) starts many jobs: supervise one run per xgen.launch (a sweep's jobs each their own)")
    return opts, overrides


def pin_run_dir(overrides: list[str], now: datetime) -> tuple[list[str], str, bool]:
    """The overrides with `hydra.run.dir` fixed, the directory, and whether it was added here.

    conf/config.yaml names the run directory `outputs/<task>/<start time>`: left to Hydra,
    every restart would begin a new run. The same pattern is computed once, relative to the
    working directory like Hydra's, and given to every attempt."""
    for override in reversed(overrides):  # the last one, as Hydra
        found = RUN_DIR.match(override)
        if found:
            value = found.group(1).strip("'\"")
            if "${" in value:
                raise UsageError(f"hydra.run.dir={value} is interpolated: give a plain path, the same for every restart")
            return overrides, value, False
    task = next((m.group(1) for m in map(TASK.match, reversed(overrides)) if m), "pretrain")
    run_dir = os.path.join("outputs", task, now.strftime("%Y-%m-%d_%H-%M-%S"))
    return [*overrides, f"hydra.run.dir={run_dir}"], run_dir, True


def read_step(run_dir: Path) -> int | None:
    """goodput.json's `step`: the newest step the run finished; None while unknown (no file
    yet, a half-written one, no step finished)."""
    try:
        step = json.loads((run_dir / "goodput.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def cause_line(lines: list[str]) -> str:
    """The line that says why a run ended: xgen's own one-line verdict ("xgen: ..."), else a
    traceback's exception line, else the last line printed."""
    for line in reversed(lines):
        if line.startswith("xgen:"):
            return line
    headers = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    after = lines[headers[-1] + 1 :] if headers else lines
    for line in reversed(after):
        if EXCEPTION_LINE.match(line):
            return line
    return next((line for line in reversed(lines) if line.strip()), "")


def exit_status(code: int) -> int:
    """A shell's exit status for a Popen returncode: death by signal N is 128 + N."""
    return 128 - code if code < 0 else code


def _killpg(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


class Supervisor:
    """Attempts of one run: start, watch, judge, back off, start again."""

    def __init__(self, opts: argparse.Namespace, command: list[str], run_dir: str):
        self.opts, self.command, self.run_dir = opts, command, Path(run_dir)
        host = socket.gethostname()
        if "SLURM_LOCALID" in os.environ:  # several supervisors per node under srun: one file each
            host += f".task{os.environ['SLURM_LOCALID']}"
        self.log_path = self.run_dir / f"launch.{host}.jsonl"
        self.host = host
        self.out = threading.RLock()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None  # the first SIGTERM/SIGINT received
        self.signals = self.reported = self.forwarded = 0
        self.last_activity = time.monotonic()

    def say(self, message: str) -> None:
        with self.out:
            print(f"xgen.launch: {message}", flush=True)

    def _on_signal(self, signum: int, frame) -> None:
        """Only flags and kill(2) here: printing could re-enter a write the main thread is in."""
        self.signals += 1
        if self.stop_signal is None:
            self.stop_signal = signum
        self._forward()

    def _forward(self) -> None:
        """The first signal to the child's process group once, a later one as SIGKILL."""
        child = self.child
        if child is None or child.returncode is not None or self.forwarded >= self.signals:
            return
        self.forwarded = self.signals
        _killpg(child.pid, self.stop_signal if self.signals == 1 else signal.SIGKILL)

    def _report_signals(self, running: bool = True) -> None:
        while self.reported < self.signals:
            self.reported += 1
            name = signal.Signals(self.stop_signal).name
            if not running:
                self.say(f"{name} between attempts: stopping, no restart")
            elif self.reported == 1:
                self.say(f"{name}: passed to the run, which saves a checkpoint and stops; no restart (a second signal kills it)")
            else:
                self.say("a second signal: killing the run (nothing saved since its last checkpoint)")

    def _pump(self, stream) -> None:
        """The child's merged output, line by line, to ours; the last lines kept for the cause."""
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.last_activity = time.monotonic()
            self.tail.append(line)
            try:
                with self.out:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
            except (OSError, ValueError):  # our stdout is gone: keep draining so the child never blocks
                pass
        stream.close()

    def attempt(self) -> tuple[int, str, float, float, int]:
        """One run of the command: (returncode, cause line, start, end, pid)."""
        self.tail.clear()
        env = {**os.environ, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1")}
        started = time.time()
        child = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.child, self.forwarded = child, 0
        self._forward()  # a signal that came while the child started
        reader = threading.Thread(target=self._pump, args=(child.stdout,), daemon=True)
        reader.start()
        silence = self.opts.silence_minutes * 60
        every = min(5.0, silence / 5) if silence else 0.0
        goodput = self.run_dir / "goodput.json"
        stamp, next_look, self.last_activity, silenced = _stamp(goodput), 0.0, time.monotonic(), False
        while True:
            try:
                child.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            self._report_signals()
            if not silence or silenced or self.stop_signal is not None:
                continue
            now = time.monotonic()
            if now >= next_look:
                next_look, seen = now + every, _stamp(goodput)
                if seen != stamp:
                    stamp, self.last_activity = seen, now
            if now - self.last_activity > silence:
                self.say(f"the run (pid {child.pid}) printed nothing and left goodput.json alone for "
                         f"{self.opts.silence_minutes:g} minutes: killing it")  # fmt: skip
                _killpg(child.pid, signal.SIGKILL)
                silenced = True
        self._report_signals()
        reader.join(timeout=5)  # a grandchild outside the group may hold the pipe open: do not wait on it
        self.child = None
        cause = f"silent for {self.opts.silence_minutes:g} minutes" if silenced else cause_line(list(self.tail))
        return child.returncode, cause, started, time.time(), child.pid

    def _record(self, record: dict) -> None:
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as ex:
            self.say(f"cannot append to {self.log_path}: {ex}")

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.stop_signal is None and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        opts, began = self.opts, time.time()
        number = restarts = streak = same = 0
        last_failure: tuple[int, int | None] | None = None
        ends: collections.Counter[int] = collections.Counter()
        self.say(f"supervising {shlex.join(self.command)}")
        self.say(f"run dir {self.run_dir} (every attempt's); attempts logged to {self.log_path}")
        final = None
        while final is None:
            if self.stop_signal is not None:  # between attempts: nothing running to save
                self._report_signals(running=False)
                final = 128 + self.stop_signal
                break
            number += 1
            before = read_step(self.run_dir)
            self.say(f"attempt {number} starts" + (f" from step {before}" if before is not None else ""))
            code, cause, started, ended, pid = self.attempt()
            step = read_step(self.run_dir)
            progress = step is not None and (before is None or step > before)
            meaning = exits.describe(code)
            ends[code] += 1
            at = f"at step {step}" if step is not None else "before any step was recorded"
            backoff, verdict = None, None
            if self.stop_signal is not None:
                final, decision = exit_status(code), "stopped by a signal: no restart"
            elif code == exits.OK:
                final, decision = exits.OK, "done"
            elif code == exits.CONFIG:
                final, decision = exits.CONFIG, "not restarted"
            else:
                streak = 0 if progress else streak
                same = same + 1 if (code, step) == last_failure else 1
                last_failure = (code, step)
                if opts.same_failure_limit and same >= opts.same_failure_limit:
                    verdict = f"the same failure (exit {code}: {meaning}) {at}, {same} times in a row: giving up"
                elif restarts >= opts.retries:
                    verdict = f"--retries {opts.retries} spent: giving up"
                if verdict:
                    final, decision = exits.GAVE_UP, "gave up"
                else:
                    backoff = min(opts.max_backoff, opts.backoff * 2**streak)
                    streak, restarts = streak + 1, restarts + 1
                    decision = f"restart {restarts} of {opts.retries} in {backoff:g} s"
            self.say(
                f"attempt {number} (pid {pid}) ended after {ended - started:.1f} s {at}: exit {code} ({meaning})"
                + (", progress" if progress else "") + (f"; cause: {cause}" if cause else "") + f"; {decision}"
            )  # fmt: skip
            self._record({
                "host": self.host, "attempt": number, "start": _clock(started), "end": _clock(ended), "pid": pid,
                "exit_code": code, "meaning": meaning, "cause": cause, "step": step, "step_at_start": before,
                "progress": progress, "decision": decision, "backoff_s": backoff,
            })  # fmt: skip
            if verdict:
                self.say(verdict)
            if backoff is not None:
                self._sleep(backoff)
        counts = ", ".join(f"exit {code} x{n}" for code, n in sorted(ends.items()))
        last = read_step(self.run_dir)
        self.say(
            f"summary: exit {final} ({exits.describe(final)}) after {number} attempt(s), {restarts} restart(s), "
            f"{timedelta(seconds=round(time.time() - began))}; last step {'unknown' if last is None else last}; "
            f"attempts ended: {counts or 'none'}"
        )
        return final


def main(argv: list[str] | None = None) -> int:
    """Parse, pin the run directory, supervise; refusals are one line on stderr and exit 2."""
    try:
        opts, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        overrides, run_dir, pinned = pin_run_dir(overrides, datetime.now())
    except UsageError as ex:
        print(f"xgen.launch: {ex}", file=sys.stderr)
        return exits.CONFIG
    supervisor = Supervisor(opts, [*opts.program, *overrides], run_dir)
    if pinned:
        supervisor.say(f"pinned hydra.run.dir={run_dir} (Hydra would time-stamp each restart anew)")
    try:
        return supervisor.run()
    except OSError as ex:  # the program cannot start, the run dir cannot be made
        print(f"xgen.launch: {ex}", file=sys.stderr)
        return exits.CONFIG


if __name__ == "__main__":
    sys.exit(main())
