"""Two processes with 4 CPU devices each, joined by JAX's multi-controller runtime."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]
COMMON = (
    "stage.seq_len=32", "stage.batch_tokens=256", "data_mix.sources.python_stdlib.max_documents=20",
    "trainer.steps=5", "trainer.log_every=1", "hardware=cpu_8",
    "hardware.mesh.data=2", "hardware.mesh.fsdp=2", "hardware.mesh.tensor=2",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    run_task(compose_config(*COMMON), single)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    multi = tmp_path / "multi"
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "xgen.run", *COMMON, "hardware.host_device_count=4",
                f"hardware.coordinator_address=127.0.0.1:{port}", "hardware.num_processes=2",
                f"hardware.process_id={i}", f"hydra.run.dir={multi}",
            ],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "over 8 cpu device(s)" in outputs[0]
    np.testing.assert_allclose(losses(multi), losses(single), rtol=2e-5)

