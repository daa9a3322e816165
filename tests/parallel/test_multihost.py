"""Two processes with 4 CPU devices each, joined by JAX's multi-controller runtime: the same
losses as one process of 8, and a preemption that only one of them receives."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]
COMMON = (
    "stage.seq_len=32", "stage.batch_tokens=256", "data_mix.sources.python_stdlib.max_documents=20",
    "trainer.log_every=1", "hardware=cpu_8",
    "hardware.mesh.data=2", "hardware.mesh.fsdp=2", "hardware.mesh.tensor=2",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(run_dir: Path, port: int, steps: int) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return [
        subprocess.Popen(
            [
                sys.executable, "-m", "xgen.run", *COMMON, f"trainer.steps={steps}", f"optimizer.decay_steps={steps}",
                "hardware.host_device_count=4", f"hardware.coordinator_address=127.0.0.1:{port}",
                "hardware.num_processes=2", f"hardware.process_id={i}", f"hydra.run.dir={run_dir}",
            ],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def wait_for_lines(path: Path, n: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_agree_on_a_preemption_and_resume_like_one_process_of_eight(tmp_path):
    """Only process 1 gets SIGTERM: both save the same step (JAX's preemption sync point),
    both exit 143, and the resumed run's losses are the single-process run's."""
    steps = 16
    single = tmp_path / "single"
    single.mkdir()
    run_task(compose_config(*COMMON, f"trainer.steps={steps}", f"optimizer.decay_steps={steps}"), single)

    multi = tmp_path / "multi"
    procs = launch(multi, free_port(), steps)
    wait_for_lines(multi / "metrics.jsonl", 3, procs)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outputs[0][-3000:] + outputs[1][-3000:]
    assert "over 8 cpu device(s)" in outputs[0]
    said = [re.findall(r"SIGTERM: saved a checkpoint at step (\d+) of", out) for out in outputs]
    saved = [int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()]
    assert said[0] == said[1] == [str(saved[0])] and len(saved) == 1 and 3 <= saved[0] < steps, said
    assert "Traceback" not in outputs[0] + outputs[1]

    procs = launch(multi, free_port(), steps)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert len(losses(multi)) == steps
    np.testing.assert_allclose(losses(multi), losses(single), rtol=2e-5)
