import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pod(*args):
    return subprocess.run(["bash", str(REPO / "launchers" / "tpu_pod.sh"), *args], capture_output=True, text=True)


def test_tpu_pod_launcher_creates_the_slice_named_by_the_hardware_file_and_starts_every_worker():
    proc = pod("--name", "x", "--zone", "us-central2-b", "--hardware", "tpu_v4_512", "--dry-run", "--", "experiment=xgen_7b_s3_8k")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "--accelerator-type v4-1024" in lines[0]  # 512 chips = 1,024 TensorCores
    assert any("scp" in line and "--worker=all" in line for line in lines)
    last = lines[-1]
    assert "--worker=all" in last and "xgen.launch\\ --\\ hardware=tpu_v4_512\\ experiment=xgen_7b_s3_8k" in last


def test_tpu_pod_launcher_runs_the_supervisor_on_one_run_dir_named_once():
    slice_ = ("--name", "x", "--zone", "z", "--dry-run")
    given = pod(*slice_, "--retries", "7", "--silence-minutes", "30", "--", "hydra.run.dir=/mnt/r")
    assert given.returncode == 0, given.stderr
    command = "python3 -m xgen.launch --retries 7 --silence-minutes 30 -- hardware=tpu_v4_8 hydra.run.dir=/mnt/r"
    assert command.replace(" ", "\\ ") in given.stdout  # the remote command, quoted by printf %q
    assert given.stdout.count("hydra.run.dir") == 1 and given.stderr == ""
    named = pod(*slice_, "--", "task=sft")
    assert re.search(r"task=sft\\ hydra\.run\.dir=outputs/sft/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", named.stdout.splitlines()[-1])
    assert "each worker's own disk" in named.stderr  # relative: not shared by the workers
    assert pod(*slice_, "--retries").returncode == 2


def test_tpu_pod_launcher_deletes_and_refuses_bad_input_in_one_line():
    assert "delete x" in pod("--name", "x", "--zone", "z", "--delete", "--dry-run").stdout
    bad = pod("--name", "x", "--zone", "z", "--hardware", "tpu_v9_1", "--dry-run")
    assert bad.returncode == 2 and "no hardware file" in bad.stderr.splitlines()[0]


def sbatch(tmp_path, *overrides, srun_exit=0, cancel=False, **env):
    """launchers/slurm.sbatch under bash, with srun and scontrol stand-ins first on PATH that record
    their argv (one per line) and srun exiting with `srun_exit`; returns (process, {tool: argv})."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_LOG/$(basename "$0").args"\n'
    cancelled = 'kill -TERM "$PPID"\n' if cancel else ""  # scancel signals the batch script too
    (bin_dir / "srun").write_text(f"{record}{cancelled}exit {srun_exit}\n")
    (bin_dir / "scontrol").write_text(record)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path), SLURM_JOB_ID="42", SLURM_NTASKS="16")
    environ.update(SLURM_SUBMIT_DIR=str(tmp_path), **env)
    script = REPO / "launchers" / "slurm.sbatch"
    proc = subprocess.run(["bash", str(script), *overrides], capture_output=True, text=True, env=environ, timeout=60)
    args = {path.name.removesuffix(".args"): path.read_text().splitlines() for path in tmp_path.glob("*.args")}
    return proc, args


def test_slurm_script_runs_the_supervisor_on_every_task_with_a_run_dir_fixed_by_the_job(tmp_path):
    proc, args = sbatch(tmp_path, "trainer.steps=5", XGEN_LAUNCH_OPTS="--retries 20 --silence-minutes 30")
    assert proc.returncode == 0, proc.stderr
    assert args["srun"] == [
        "--label", "python", "-m", "xgen.launch", "--retries", "20", "--silence-minutes", "30", "--",
        "hardware=gpu_1", "hardware.distributed=true", "hardware.num_devices=16",
        f"hydra.run.dir={tmp_path}/outputs/slurm/42", "trainer.steps=5",
    ]  # fmt: skip
    assert "scontrol" not in args


def test_slurm_script_leaves_a_given_run_dir_and_hardware_alone(tmp_path):
    proc, args = sbatch(tmp_path, "hydra.run.dir=/shared/run", XGEN_HARDWARE="gpu_h200")
    assert proc.returncode == 0, proc.stderr
    assert [a for a in args["srun"] if "run.dir" in a] == ["hydra.run.dir=/shared/run"] and "hardware=gpu_h200" in args["srun"]
    assert "run dir /shared/run" in proc.stdout


@pytest.mark.parametrize("code", [0, 1, 2, 3, 124, 143])
def test_slurm_script_requeues_only_when_the_time_limits_sigterm_stopped_the_run(tmp_path, code):
    proc, args = sbatch(tmp_path, srun_exit=code)
    assert proc.returncode == code
    assert args.get("scontrol") == (["requeue", "42"] if code == 143 else None)


def test_slurm_script_does_not_requeue_a_cancelled_job(tmp_path):
    proc, args = sbatch(tmp_path, srun_exit=143, cancel=True)
    assert proc.returncode == 143 and "scontrol" not in args


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None, reason="extra slurm")
def test_slurm_launcher_config_composes():
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "hydra/launcher=slurm_gpu", "hydra.launcher.nodes=2", "--cfg", "hydra"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "SlurmLauncher" in proc.stdout and "nodes: 2" in proc.stdout and "gpus_per_node: 8" in proc.stdout
    assert "max_num_timeout: 20" in proc.stdout  # requeued at the time limit (and on preemption)
