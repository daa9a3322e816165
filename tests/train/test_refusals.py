"""What a run refuses instead of going on silently (issue 31): a second process on its run
directory, fewer steps than its checkpoint holds, a rollback with nothing to go back to,
storage that cannot take a checkpoint, a checkpoint of another model. Each ends in one line
(exit 2 for the command), before work where it can be known before work, and loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen import checkpoint
from xgen.checkpoint import ShapeMismatch
from xgen.config import ConfigError
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]
FAST = ("stage.seq_len=32", "stage.batch_tokens=128", "data_mix.sources.python_stdlib.max_documents=20",
        "optimizer.decay_steps=8", "trainer.checkpoint_every=2", "trainer.log_every=1")  # fmt: skip


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "xgen.run", *FAST, *overrides, f"hydra.run.dir={run_dir}"]


def xgen_run(run_dir: Path, *overrides: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, *overrides), capture_output=True, text=True, timeout=300, cwd=REPO, **popen)


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def one_line(proc: subprocess.CompletedProcess, starts: str) -> str:
    """The command's one line on stderr (and no traceback anywhere on the console)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith(starts), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and "Exception ignored" not in proc.stdout + proc.stderr
    return lines[0]


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder_and_the_first_run_stays_complete(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(command(run_dir, "trainer.steps=8"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lock = run_dir / ".xgen.lock"
    deadline = time.time() + 120
    while not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.1)
    second = xgen_run(run_dir, "trainer.steps=8")  # the same command again: a requeued job, say
    line = one_line(second, "xgen: refused: run directory")
    assert f"pid {first.pid} on host {os.uname().nodename}" in line
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert steps_logged(run_dir) == list(range(1, 9))  # once, the refused one's start cut these short
    assert checkpoint.latest_step(run_dir / "checkpoints") == 8


def test_a_finished_run_with_a_damaged_final_checkpoint_falls_back_on_rerun_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    assert xgen_run(run_dir, "trainer.steps=4").returncode == 0
    before = losses(run_dir)
    array = max((p for p in (run_dir / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)  # fmt: skip
    data = bytearray(array.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    array.write_bytes(bytes(data))
    rerun = xgen_run(run_dir, "trainer.steps=4")  # once: "nothing to do", exit 0
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    console = rerun.stdout + rerun.stderr
    assert "Traceback" not in console and "Exception ignored" not in console  # orbax's late errors: run.log only
    assert "checkpoints/4 " in console and "trying the checkpoint before it" in console and "nothing to do" not in console
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "checkpoint_damaged"] == [4]
    assert losses(run_dir) == before  # steps 3-4 trained again from step 2, bit for bit
    assert checkpoint.latest_step(run_dir / "checkpoints") == 4


def test_fewer_steps_than_the_newest_checkpoint_are_refused_and_the_summary_is_left_alone(tmp_path):
    run_task(compose_config(*FAST, "trainer.steps=4"), tmp_path)
    summary = (tmp_path / "summary.json").read_text()
    with pytest.raises(ConfigError, match=r"trainer.steps=2 ends this run at step 2, but its checkpoint in .* is already at step 4: set trainer.steps=4 or more"):
        run_task(compose_config(*FAST, "trainer.steps=2"), tmp_path)
    assert (tmp_path / "summary.json").read_text() == summary


def test_a_checkpoint_of_another_model_is_refused_naming_the_arrays_and_nothing_is_moved(tmp_path):
    run_task(compose_config(*FAST, "trainer.steps=2"), tmp_path)
    changed = compose_config(*FAST, "trainer.steps=4", "model.d_ff=128", "trainer.allow_changes=[model.d_ff]")
    with pytest.raises(ShapeMismatch, match=r"shapes differ: params\.layers\.0\.mlp\.down_proj\.kernel \(176, 64\) stored, \(128, 64\) here"):
        run_task(changed, tmp_path)
    assert not (tmp_path / "damaged_checkpoints").exists() and checkpoint.latest_step(tmp_path / "checkpoints") == 2
    # Without the allowance the config check names the key first, before any array is read.
    with pytest.raises(ConfigError, match=r"model.d_ff: 176 -> 128"):
        run_task(compose_config(*FAST, "trainer.steps=4", "model.d_ff=128"), tmp_path)


def test_checkpoints_that_cannot_be_written_are_refused_before_the_first_step(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoints go\n")
    proc = xgen_run(tmp_path / "run", "trainer.steps=2")
    line = one_line(proc, "xgen: storage error: checkpoints cannot be written to")
    assert "it is a file, not a directory" in line
    assert "step 1/2" not in proc.stdout  # refused before training
    proc = xgen_run(Path("/proc/xgen-run"), "trainer.steps=2")  # Hydra's own set-up fails there
    assert one_line(proc, "xgen: storage error: cannot write /proc/xgen-run")


def _file_size_limit(limit: int):
    """In the child: files may not grow past `limit` bytes (writes fail with EFBIG, as on a
    full disk), the signal that would kill the process for it ignored."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_save_that_fails_on_the_disk_ends_in_one_line_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path):
    run_dir = tmp_path / "run"
    assert xgen_run(run_dir, "trainer.steps=2").returncode == 0
    # Steps 3-4 train, then step 4's checkpoint meets a disk that takes no large file.
    failed = xgen_run(run_dir, "trainer.steps=4", preexec_fn=_file_size_limit(2 * 2**20))
    line = one_line(failed, "xgen: storage error: the checkpoint of step 4 cannot be written: File too large")
    assert f"{run_dir}/checkpoints/4.orbax-checkpoint-tmp" in line and "the newest good checkpoint is step 2" in line
    trained = losses(run_dir)
    assert sorted(trained) == [1, 2, 3, 4] and checkpoint.latest_step(run_dir / "checkpoints") == 2
    resumed = xgen_run(run_dir, "trainer.steps=4")  # room again: the same command resumes at step 2
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == trained and checkpoint.latest_step(run_dir / "checkpoints") == 4


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_the_first_step(tmp_path):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "4m"):
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        proc = xgen_run(small / "run", "trainer.steps=2")
        line = one_line(proc, "xgen: storage error:")
        assert f"GiB free in {small}/run/checkpoints, but one checkpoint of this run takes" in line
        assert "step 1/2" not in proc.stdout
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_checkpoint_from_before_a_setting_that_changes_no_number_still_resumes():
    """trainer.spike.max_rollbacks says when a run stops, not what it computes: a checkpoint
    written before the key existed resumes (under trainer.spike.*, it would be refused)."""
    from xgen.train.resume import check_resume

    cfg = compose_config(*FAST, "trainer.steps=6")
    saved = dataclasses.asdict(cfg)
    del saved["trainer"]["spike"]["max_rollbacks"]
    assert check_resume(saved, cfg, "an older run") == {}
    saved["trainer"]["spike"]["threshold"] = 3.0  # a setting of the detector itself still defines the run
    with pytest.raises(ConfigError, match=r"trainer.spike.threshold: 3.0 -> 6.0"):
        check_resume(saved, cfg, "an older run")
