"""`python -m xgen.launch`: restarts, give-up rules, signals, silence, the pinned run dir and its log,
on small fake programs (a plan of what each attempt does), and once on a real run killed with -9."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_layering import imported_modules
from xgen import exits
from xgen.launch import cause_line, read_step

REPO = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # one log file per host, not per task

# Attempt n does plan[n] (the last entry once the plan runs out): writes goodput.json's step
# ("attempt": n + 1), prints, then hangs, waits for SIGTERM, kills itself, or exits with a code.
# Every attempt appends its argv to calls.jsonl in the run dir.
FAKE = r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

plan = json.loads(Path(sys.argv[1]).read_text())
run_dir = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.run.dir=")))
run_dir.mkdir(parents=True, exist_ok=True)
calls = run_dir / "calls.jsonl"
n = len(calls.read_text().splitlines()) if calls.exists() else 0
with calls.open("a") as f:
    f.write(json.dumps(sys.argv[2:]) + "\n")
act = plan[min(n, len(plan) - 1)]
if "step" in act:
    step = n + 1 if act["step"] == "attempt" else act["step"]
    (run_dir / "goodput.json").write_text(json.dumps({"step": step}))
for line in act.get("say", [f"attempt {n}"]):
    print(line, flush=True)
if act.get("hang"):
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (run_dir / "grandchild.pid").write_text(str(grandchild.pid))
    time.sleep(600)
if act.get("wait_for_signal"):
    def stop(signum, frame):
        (run_dir / "child_got").write_text(signal.Signals(signum).name)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    (run_dir / "ready").write_text("")
    time.sleep(600)
if act.get("kill9"):
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(act.get("exit", 0))
"""


def launch_args(tmp_path: Path, plan: list[dict], *options: str) -> list[str]:
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "fake.py").write_text(FAKE)
    program = shlex.join([sys.executable, str(tmp_path / "fake.py"), str(tmp_path / "plan.json")])
    return [sys.executable, "-m", "xgen.launch", "--backoff", "0.05", "--program", program, *options]


def supervise(tmp_path: Path, plan: list[dict], *options: str, overrides=None):
    """Run the supervisor to its end; returns (the finished process, the run dir)."""
    run_dir = tmp_path / "run"
    overrides = [f"hydra.run.dir={run_dir}"] if overrides is None else overrides
    args = [*launch_args(tmp_path, plan, *options), "--", *overrides]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=ENV)
    return proc, run_dir


def calls(run_dir: Path) -> list[list[str]]:
    return [json.loads(line) for line in (run_dir / "calls.jsonl").read_text().splitlines()]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"launch.{socket.gethostname()}.jsonl").read_text().splitlines()]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def alive(pid: int) -> bool:
    """Running (a zombie that no one reaped counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_crash_and_a_kill_9_are_restarted_and_the_run_finishes(tmp_path):
    traceback = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "RuntimeError: boom", "after"]
    plan = [{"step": 1, "exit": 1, "say": traceback}, {"step": 2, "kill9": True}, {"step": 3, "exit": 0, "say": ["fine"]}]
    proc, run_dir = supervise(tmp_path, plan)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(calls(run_dir)) == 3
    assert "RuntimeError: boom" in proc.stdout and "fine" in proc.stdout  # the child's lines pass through
    got = records(run_dir)
    assert [r["exit_code"] for r in got] == [1, -signal.SIGKILL, 0]
    assert got[0]["cause"] == "RuntimeError: boom" and got[1]["meaning"] == exits.describe(-9)
    assert "summary: exit 0" in proc.stdout.splitlines()[-1]


def test_the_log_of_attempts_records_each_one_in_a_json_line(tmp_path):
    proc, run_dir = supervise(tmp_path, [{"step": 5, "exit": 124, "say": ["xgen: hang: no step in 1 minute"]}, {"exit": 0}])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = records(run_dir)
    assert [first["attempt"], second["attempt"]] == [1, 2]
    assert first["exit_code"] == exits.HANG and first["meaning"] == exits.MEANING[exits.HANG]
    assert first["cause"] == "xgen: hang: no step in 1 minute" and first["step"] == 5 and first["backoff_s"] == 0.05
    assert first["decision"].startswith("restart 1 of 100") and second["decision"] == "done"
    for record in (first, second):
        assert isinstance(record["pid"], int) and record["start"] <= record["end"]
    assert sum(line.startswith("xgen.launch: attempt") for line in proc.stdout.splitlines()) == 4  # starts and ends


def test_a_config_error_is_never_restarted(tmp_path):
    proc, run_dir = supervise(tmp_path, [{"exit": 2, "say": ["xgen: config error: no such key"]}])
    assert proc.returncode == exits.CONFIG
    assert len(calls(run_dir)) == 1 and records(run_dir)[0]["cause"] == "xgen: config error: no such key"


def test_the_same_failure_at_the_same_step_three_times_gives_up(tmp_path):
    proc, run_dir = supervise(tmp_path, [{"step": 7, "exit": 1}])
    assert proc.returncode == exits.GAVE_UP, proc.stdout + proc.stderr
    assert len(calls(run_dir)) == 3
    assert re.search(r"the same failure \(exit 1: .*\) at step 7, 3 times in a row: giving up", proc.stdout)


def test_progress_resets_the_backoff_and_a_stalled_run_doubles_it(tmp_path):
    stalled = {"exit": 1}  # no step: nothing learnt, the wait doubles up to the cap
    plan = [stalled, stalled, stalled, {"step": 1, "exit": 1}, {"step": 2, "exit": 1}, {"step": 3, "exit": 0}]
    proc, run_dir = supervise(tmp_path, plan, "--same-failure-limit", "0", "--max-backoff", "0.15")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["backoff_s"] for r in records(run_dir)] == [0.05, 0.1, 0.15, 0.05, 0.05, None]
    assert [r["progress"] for r in records(run_dir)] == [False, False, False, True, True, True]


def test_failures_at_new_steps_do_not_give_up(tmp_path):
    plan = [{"step": "attempt", "exit": 1}] * 4 + [{"step": 9, "exit": 0}]
    proc, run_dir = supervise(tmp_path, plan)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(calls(run_dir)) == 5


def test_spent_retries_give_up(tmp_path):
    proc, run_dir = supervise(tmp_path, [{"step": "attempt", "exit": 1}], "--retries", "2")
    assert proc.returncode == exits.GAVE_UP
    assert len(calls(run_dir)) == 3 and "--retries 2 spent: giving up" in proc.stdout


def test_a_silent_run_is_killed_with_its_children_and_restarted(tmp_path):
    proc, run_dir = supervise(tmp_path, [{"hang": True}, {"exit": 0}], "--silence-minutes", "0.05")  # 3 s
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = records(run_dir)[0]
    assert first["exit_code"] == -signal.SIGKILL and first["cause"] == "silent for 0.05 minutes"
    grandchild = int((run_dir / "grandchild.pid").read_text())
    deadline = time.time() + 10
    while alive(grandchild) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)  # the whole process group, not only the child


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_supervisor_is_passed_on_and_never_restarted(tmp_path, signum):
    run_dir = tmp_path / "run"
    args = [*launch_args(tmp_path, [{"step": 4, "wait_for_signal": True}, {"exit": 0}]), "--", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    wait_for(run_dir / "ready", proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, out
    assert (run_dir / "child_got").read_text() == signal.Signals(signum).name
    assert len(calls(run_dir)) == 1 and "no restart" in out


def test_a_signal_during_the_backoff_stops_without_another_attempt(tmp_path):
    run_dir = tmp_path / "run"
    args = [*launch_args(tmp_path, [{"exit": 1}], "--backoff", "60"), "--", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    wait_for(run_dir / f"launch.{socket.gethostname()}.jsonl", proc)  # written as the backoff starts
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == exits.SIGTERM and len(calls(run_dir)) == 1, out
    assert "SIGTERM between attempts: stopping" in out


def test_a_child_stopped_by_sigterm_that_the_supervisor_did_not_get_is_restarted(tmp_path):
    # Another host of a pod was preempted: JAX's preemption sync saved and stopped this one too.
    proc, run_dir = supervise(tmp_path, [{"step": 4, "exit": 143}, {"step": 6, "exit": 0}])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["exit_code"] for r in records(run_dir)] == [143, 0]


def test_the_run_dir_is_pinned_once_and_every_attempt_gets_it(tmp_path):
    proc, _ = supervise(tmp_path, [{"exit": 1}, {"exit": 0}], overrides=["task=sft", "a=1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pinned = re.search(r"pinned hydra\.run\.dir=(\S+)", proc.stdout).group(1)
    assert re.fullmatch(r"outputs/sft/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", pinned)
    assert calls(tmp_path / pinned) == [["task=sft", "a=1", f"hydra.run.dir={pinned}"]] * 2


@pytest.mark.parametrize(
    "args,says",
    [
        (["--retries", "-1"], "--retries must be 0 or more"),
        (["--backoff", "soon"], "invalid float value"),
        (["--", "-m", "optimizer.lr=1e-4,3e-4"], "multirun"),
        (["--", "hydra.run.dir=outputs/${now:%H-%M}"], "plain path"),
    ],
    ids=["negative", "not-a-number", "multirun", "interpolated-run-dir"],
)  # fmt: skip
def test_bad_options_are_refused_in_one_line(tmp_path, args, says):
    proc = subprocess.run([sys.executable, "-m", "xgen.launch", *args], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and says in proc.stderr, proc.stderr


def test_a_half_written_goodput_file_is_an_unknown_step(tmp_path):
    assert read_step(tmp_path) is None
    (tmp_path / "goodput.json").write_text('{"step": 1')
    assert read_step(tmp_path) is None
    (tmp_path / "goodput.json").write_text('{"step": 12, "productive": 3.5}')
    assert read_step(tmp_path) == 12


def test_the_cause_is_xgens_line_else_the_exception_else_the_last_line():
    assert cause_line(["a", "xgen: refused", "Traceback (most recent call last):", "ValueError: x"]) == "xgen: refused"
    assert cause_line(["Traceback (most recent call last):", "  raise", "ValueError: x", "", "exiting"]) == "ValueError: x"
    assert cause_line(["step 1", "step 2", ""]) == "step 2"


def test_the_supervisor_imports_neither_jax_nor_hydra():
    own = {name for name in imported_modules(REPO / "xgen" / "launch.py") if name.split(".")[0] == "xgen"}
    assert own == {"xgen", "xgen.exits"}  # the standard library and the exit-code table only
    code = "import sys, xgen.launch; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'hydra', 'omegaconf')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_the_docs_table_of_exit_codes_is_xgen_exits_meaning():
    text = (REPO / "docs" / "launching.md").read_text()
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `?(\d+)`? \| (.+?) \|$", section, re.MULTILINE)
    assert {int(code): meaning for code, meaning in rows} == exits.MEANING
    assert len(rows) == len(exits.MEANING)


# Real xgen.run children under the supervisor, killed with SIGKILL: tests/parallel/test_faults.py.
