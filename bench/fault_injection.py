"""Fault injection: a two-process run under two supervisors, one process killed with
SIGKILL at random moments, against the same run uninterrupted.

    python bench/fault_injection.py --trials 10        # writes its table into docs/performance.md

Two `jax.distributed` processes of 4 CPU devices each on 127.0.0.1, each run by its own
`python -m xgen.launch` (as on a pod, one supervisor per host). Each trial kills one
process's `xgen.run` (chosen at random) at one of three moments: between steps, while a
checkpoint is being saved (right after a step that saves) or while the restarted run
restores its checkpoint (after a first kill that restarted it). The other process then fails (its peer is gone) or hangs in a
collective until its watchdog (`trainer.step_timeout_minutes`) ends it; both supervisors
restart their process. A trial's recovery time runs from the kill to the next step the
run finishes. At the end, the losses and gradient norms must equal the uninterrupted run's
bit for bit. `tests/parallel/test_faults.py` runs a few trials of the same driver."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.data import write_section  # noqa: E402

RUN = (
    "stage.seq_len=32", "stage.batch_tokens=256", "data_mix.sources.python_stdlib.max_documents=20", "trainer.log_every=1",
    "hardware=cpu_8", "hardware.mesh.data=2", "hardware.mesh.fsdp=2", "hardware.mesh.tensor=2", "hardware.host_device_count=4",
    "trainer.checkpoint_every=3", "trainer.checkpoints_to_keep=2", "trainer.step_timeout_minutes=0.1",
)  # fmt: skip
# The restart waits out the survivor's watchdog (6 s), so both processes start afresh together.
SUPERVISOR = ("--backoff", "8", "--max-backoff", "8", "--same-failure-limit", "0", "--silence-minutes", "1")
MOMENTS = ("between steps", "mid-save", "mid-restore")
STEP = r"step (\d+)/\d+ \|"  # a progress line: that step finished


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path) -> dict[int, tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records}


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


class Supervised:
    """One process of the run under its own supervisor; its output kept line by line with times."""

    def __init__(self, run_dir: Path, process_id: int, port: int, steps: int, supervised: bool = True):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        run = (*RUN, f"trainer.steps={steps}", f"optimizer.decay_steps={steps}", f"hardware.coordinator_address=127.0.0.1:{port}",
               "hardware.num_processes=2", f"hardware.process_id={process_id}", f"hydra.run.dir={run_dir}")  # fmt: skip
        head = [sys.executable, "-m", "xgen.launch", *SUPERVISOR, "--"] if supervised else [sys.executable, "-m", "xgen.run"]
        if not supervised:  # the reference run: nothing restarts it, so no watchdog to end it
            run = (*run, "trainer.step_timeout_minutes=0")
        self.proc = subprocess.Popen([*head, *run], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def child(self) -> int | None:
        found = children(self.proc.pid)
        return found[0] if found else None

    def wait_for(self, pattern: str, after: float, deadline: float, accept=lambda match: True) -> tuple[float, re.Match] | None:
        """The first line after `after` that matches (and that `accept` takes)."""
        regex = re.compile(pattern)
        seen = 0
        while time.time() < deadline and self.proc.poll() is None:
            for t, line in self.lines[seen:]:
                match = regex.search(line)
                if t >= after and match and accept(match):
                    return t, match
            seen = len(self.lines)
            time.sleep(0.01)
        return None

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def tail(self) -> str:
        return "\n".join(line for _, line in self.lines[-40:])


def uninterrupted(run_dir: Path, steps: int) -> dict[int, tuple[float, float]]:
    port = free_port()
    procs = [Supervised(run_dir, i, port, steps, supervised=False) for i in range(2)]
    codes = [p.finish(600) for p in procs]
    assert codes == [0, 0], procs[0].tail() + procs[1].tail()
    return metrics(run_dir)


def run_trials(workdir: Path, trials: int, seed: int = 0, moments: tuple[str, ...] = MOMENTS) -> dict:
    """`trials` kills in one supervised two-process run, the first at each of `moments` in
    turn, the rest at random ones; returns each trial and the verdict."""
    rng = random.Random(seed)
    steps = 12 + 6 * trials
    straight = uninterrupted(workdir / "straight", steps)
    run_dir = workdir / "faulted"
    port = free_port()
    procs = [Supervised(run_dir, i, port, steps) for i in range(2)]
    results = []
    since = time.time()
    try:
        for trial in range(trials):
            moment = moments[trial] if trial < len(moments) else rng.choice(MOMENTS)
            victim = procs[rng.randrange(2)]
            deadline = time.time() + 300
            # Some progress first: a few steps past the one the run recovered at.
            first = victim.wait_for(STEP, since, deadline)
            after = int(first[1].group(1)) + rng.randint(1, 4) if first else 0
            progressed = lambda m, at_least=after: int(m.group(1)) >= at_least  # noqa: E731
            if moment == "mid-restore":  # a first kill, then the restarted process when its restore begins
                victim.wait_for(STEP, since, deadline, progressed)
                os.kill(victim.child(), signal.SIGKILL)
                seen = victim.wait_for(r"train step memory", time.time() + 1.0, deadline)
            elif moment == "mid-save":  # right after a step that saves (every 3rd): its save has begun
                seen = victim.wait_for(STEP, since, deadline, lambda m: progressed(m) and int(m.group(1)) % 3 == 0)
            else:
                seen = victim.wait_for(STEP, since, deadline, progressed)
                time.sleep(rng.uniform(0.0, 0.3))
            child = victim.child()
            if seen is None or child is None:
                raise RuntimeError(f"trial {trial}: the run did not reach the moment ({moment}):\n{victim.tail()}")
            step = json.loads((run_dir / "goodput.json").read_text()).get("step") if (run_dir / "goodput.json").exists() else None
            os.kill(child, signal.SIGKILL)
            killed = time.time()
            # Recovered: a progress line (a step finished) from a process started after the kill.
            again = procs[0].wait_for(STEP, killed + 1.0, killed + 300)
            if again is None:
                raise RuntimeError(f"trial {trial}: no step after the kill:\n{procs[0].tail()}\n{procs[1].tail()}")
            results.append({"trial": trial + 1, "moment": moment, "process": procs.index(victim), "step": step,
                            "recovery_s": round(again[0] - killed, 1)})  # fmt: skip
            since = again[0]
        codes = [p.finish(900) for p in procs]
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGKILL)
    faulted = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
    restarts = sum(len((run_dir / f).read_text().splitlines()) - 1 for f in os.listdir(run_dir) if f.startswith("launch."))
    return {
        "trials": results,
        "exit_codes": codes,
        "restarts": restarts,
        "steps": steps,
        "identical": faulted == straight and len(faulted) == steps,
        "tails": [p.tail() for p in procs],
    }


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="print the table, do not write docs/performance.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = run_trials(Path(tmp), args.trials, args.seed)
    out.pop("tails")
    print(json.dumps(out, indent=1))
    recov = [t["recovery_s"] for t in out["trials"]]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    rows = "\n".join(f"| {t['trial']} | {t['moment']} | {t['process']} | {t['step']} | {t['recovery_s']} s |" for t in out["trials"])
    day = time.strftime("%Y-%m-%d")
    section = f"""### Fault injection: kill -9 under the supervisor ({day}, {os.cpu_count()} CPUs, {cpu})

`python bench/fault_injection.py --trials {args.trials}`: two `jax.distributed` processes of 4 CPU
devices each (the tiny model, {out['steps']} steps, a checkpoint every 3), each under its own
`python -m xgen.launch`; each trial kills one process's `xgen.run` with SIGKILL, between steps,
right after a step that saves (mid-save) or, after a first kill, when the restarted process
begins its restore (mid-restore). The survivor fails or is ended by its watchdog
(`trainer.step_timeout_minutes=0.1`), both supervisors restart (backoff 8 s), and the run
resumes from its last checkpoint. Recovery runs from the kill to the next finished step: the
6 s watchdog, the 8 s backoff, a fresh process's start (Python, JAX, the data pipeline, a
compilation-cache hit) and the restore.

| trial | moment | process killed | step at the kill | recovery |
|---|---|---|---|---|
{rows}

{len(out['trials'])} of {args.trials} trials recovered with no human ({out['restarts']} restarts in all; the supervisors
exited {out['exit_codes']}); the final losses and gradient norms are {'bit-identical to' if out['identical'] else 'DIFFERENT from'} the
uninterrupted run's. Recovery: median {statistics.median(recov):.1f} s, min {min(recov):.1f} s, max {max(recov):.1f} s.
"""
    print(section)
    if not args.no_docs:
        write_section("fault_injection", section)


if __name__ == "__main__":
    main()
