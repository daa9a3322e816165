import importlib.util
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
    assert "--worker=all" in last and "xgen.run\\ hardware=tpu_v4_512\\ experiment=xgen_7b_s3_8k" in last


def test_tpu_pod_launcher_deletes_and_refuses_bad_input_in_one_line():
    assert "delete x" in pod("--name", "x", "--zone", "z", "--delete", "--dry-run").stdout
    bad = pod("--name", "x", "--zone", "z", "--hardware", "tpu_v9_1", "--dry-run")
    assert bad.returncode == 2 and "no hardware file" in bad.stderr.splitlines()[0]


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None, reason="extra slurm")
def test_slurm_launcher_config_composes():
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "hydra/launcher=slurm_gpu", "hydra.launcher.nodes=2", "--cfg", "hydra"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "SlurmLauncher" in proc.stdout and "nodes: 2" in proc.stdout and "gpus_per_node: 8" in proc.stdout
