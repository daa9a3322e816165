"""A run that changes shape between restarts: two processes (4 CPU devices each, joined by
JAX's multi-controller runtime) that save by time agree on the step, and a run moved from
two processes to one and back trains every sequence of the data order exactly once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]
COMMON = (
    "stage.seq_len=32", "stage.batch_tokens=256", "data_mix.sources.python_stdlib.max_documents=20",
    "trainer.log_every=1", "hardware=cpu_8", "hardware.mesh.data=2", "hardware.mesh.fsdp=2", "hardware.mesh.tensor=2",
    "optimizer.decay_steps=12", "loader.trace_sequences=true", "trainer.checkpoints_to_keep=50",
)  # fmt: skip
BATCH = 256 // 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(run_dir: Path, *overrides: str) -> list[str]:
    """Both processes of one run to the end; their outputs."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "xgen.run", *COMMON, *overrides, "hardware.host_device_count=4",
             f"hardware.coordinator_address=127.0.0.1:{port}", "hardware.num_processes=2", f"hardware.process_id={i}",
             f"hydra.run.dir={run_dir}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


def saved_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def sequences(run_dir: Path) -> dict[int, list[int]]:
    """Each step's sequence ids over every process that trained it."""
    steps: dict[int, list[int]] = {}
    for path in sorted((run_dir / "data_trace").glob("process-*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            steps.setdefault(record["step"], []).extend(record["ids"])
    return steps


@pytest.mark.slow
def test_time_based_saves_agree_across_processes_and_the_run_moves_from_two_processes_to_one_and_back(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    run_task(compose_config(*COMMON, "trainer.steps=12"), straight)

    moved = tmp_path / "moved"
    # Two processes for steps 1-4, saving whenever 0.1 s passed on process 0's clock: if the
    # processes disagreed on a step, orbax's collective save would hang (and the watchdog end it).
    two_processes(moved, "trainer.steps=4", "trainer.checkpoint_minutes=0.002", "trainer.step_timeout_minutes=2")
    by_time = saved_steps(moved)
    assert len(by_time) >= 2 and by_time[-1] == 4, by_time  # saves besides the final one
    run_task(compose_config(*COMMON, "trainer.steps=8"), moved)  # one process of 8 devices: steps 5-8
    two_processes(moved, "trainer.steps=12")  # two again: 9-12

    np.testing.assert_allclose([losses(moved)[s] for s in range(1, 13)], [losses(straight)[s] for s in range(1, 13)], rtol=2e-5)
    trained, order = sequences(moved), sequences(straight)
    assert sorted(trained) == list(range(1, 13))
    counts = Counter(i for ids in trained.values() for i in ids)
    assert sorted(counts) == list(range(12 * BATCH)) and set(counts.values()) == {1}  # none skipped, none repeated
    assert all(sorted(trained[s]) == sorted(order[s]) for s in trained)  # each step the straight run's sequences
