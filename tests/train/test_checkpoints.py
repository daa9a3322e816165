"""Checkpoints: kill -9 and SIGTERM mid-run (and the time account of a killed run), restore on another mesh (8 devices
to 1), retention, rollback."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.tasks import run_task
from xgen.train.goodput import CATEGORIES

REPO = Path(__file__).resolve().parents[2]
FAST = ("stage.seq_len=32", "stage.batch_tokens=256", "data_mix.sources.python_stdlib.max_documents=20")


def metrics(run_dir: Path) -> dict[int, tuple[float, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records}


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "xgen.run", *FAST, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_lines(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_is_bit_identical_after_sigkill_at_random_moments(tmp_path):
    run = ("trainer.steps=20", "trainer.log_every=1", "trainer.checkpoint_every=3", "optimizer.decay_steps=20")
    straight = tmp_path / "straight"
    straight.mkdir()
    run_task(compose_config(*FAST, *run), straight)

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills, reached, t0 = 0, [], time.time()
    for target in (5, 13):
        proc = start(killed, *run)
        wait_for_lines(killed, target, proc)
        time.sleep(rng.uniform(0.0, 0.4))  # between steps, or inside an asynchronous save
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        reached.append(json.loads((killed / "goodput.json").read_text())["step"])
        time.sleep(0.5)  # down time: idle in the time account
    assert kills >= 2
    proc = start(killed, *run)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    outside = time.time() - t0
    assert metrics(killed) == metrics(straight)
    # Where the time went (goodput.json), across the three attempts: every category, adding up
    # to the wall time seen from outside, with the steps trained twice counted.
    account = json.loads((killed / "goodput.json").read_text())
    attempts = account["attempts"]
    assert account["step"] == 20 and len(attempts) == 3
    redone = [reached[k] - attempts[k + 1]["resumed_from"] for k in range(2)]
    assert [a.get("lost_steps", 0) for a in attempts[:2]] == redone and account["lost_steps"] == sum(redone)
    seconds = account["seconds"]
    assert set(seconds) == set(CATEGORIES) and all(v >= 0 for v in seconds.values())
    assert sum(seconds.values()) == pytest.approx(account["wall_s"], abs=0.01)
    assert outside - 3.0 <= account["wall_s"] <= outside + 0.1  # less Python's start and exit; /proc's start is to 10 ms
    assert seconds["idle"] >= 1.0 and min(seconds[k] for k in ("startup", "compile", "restore", "productive", "checkpoint")) > 0
    assert (seconds["lost"] > 0) == (sum(redone) > 0)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits_128_plus_the_signal(tmp_path, signum, code):
    run = ("trainer.steps=400", "trainer.log_every=1", "optimizer.decay_steps=400")
    proc = start(tmp_path, *run)
    wait_for_lines(tmp_path, 3, proc)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == code, proc.stderr.read()[-2000:]
    assert "Traceback" not in proc.stderr.read()
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 400
    assert max(metrics(tmp_path)) == saved[0]


@pytest.mark.slow
def test_checkpoint_from_eight_devices_restores_on_one(tmp_path):
    common = (*FAST, "trainer.log_every=1", "optimizer.decay_steps=6")
    straight = tmp_path / "straight"
    straight.mkdir()
    run_task(compose_config(*common, "trainer.steps=6"), straight)
    mixed = ("hardware=cpu_8", "hardware.mesh.data=2", "hardware.mesh.fsdp=2", "hardware.mesh.tensor=2")
    for name, second in (("one", ("hardware=cpu",)),):
        run_dir = tmp_path / name
        run_dir.mkdir()
        run_task(compose_config(*common, *mixed, "trainer.steps=3"), run_dir)
        run_task(compose_config(*common, *second, "trainer.steps=6"), run_dir)
        got, want = metrics(run_dir), metrics(straight)
        np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=2e-5)


def test_keeps_the_last_k_and_every_mth_checkpoint(tmp_path):
    run_task(
        compose_config(
            *FAST, "trainer.steps=12", "trainer.checkpoint_every=1", "trainer.checkpoints_to_keep=2",
            "trainer.checkpoints_keep_every=5",
        ),
        tmp_path,
    )  # fmt: skip
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [5, 10, 11, 12]


def test_rollback_restores_the_last_checkpoint_and_skips_the_spiky_batches(tmp_path):
    # A threshold of 0 makes the first step after the warmup whose loss is above the running
    # mean a spike; the run must roll back to its last checkpoint and still finish.
    run_task(
        compose_config(
            *FAST, "trainer.steps=14", "trainer.checkpoint_every=4", "trainer.log_every=1",
            "trainer.spike.policy=rollback", "trainer.spike.threshold=0", "trainer.spike.warmup_steps=6",
            "trainer.spike.max_rollbacks=10",
            # Every document trained on: with threshold 0 whether the run gets past its spikes
            # depends on the batches, and these are the ones whose spikes it gets past.
            "data_mix.heldout_share=0",
        ),
        tmp_path,
    )  # fmt: skip
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    spikes = [e for e in events if e["event"] == "spike"]
    assert rollbacks and spikes
    first = rollbacks[0]
    assert first["to_step"] % 4 == 0 and first["to_step"] < first["step"]
    assert all(s["data_index"] is not None and not s["update_applied"] for s in spikes)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 14
    assert sorted(metrics(tmp_path)) == list(range(1, 15))  # each step logged once, after the rollbacks


def test_a_spike_before_the_first_checkpoint_rolls_back_to_the_start_and_spikes_that_return_stop_the_run(tmp_path):
    """Once, a rollback with no checkpoint yet skipped the update and went on: a run whose
    every step spiked ended "done", exit 0, with nothing trained. Under the policy the run now
    saves its start; going back to one checkpoint more than max_rollbacks times in a row ends
    the run in one line."""
    cfg = compose_config(
        *FAST, "trainer.steps=10", "trainer.checkpoint_every=100", "trainer.log_every=1", "trainer.spike.policy=rollback",
        "trainer.spike.threshold=0", "trainer.spike.warmup_steps=2", "trainer.spike.max_rollbacks=1",
    )  # fmt: skip
    with pytest.raises(SystemExit, match=r"^xgen: loss spike at step \d+: rolled back to step 0 2 times \(trainer.spike.max_rollbacks=1\)"):
        run_task(cfg, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [(r["to_step"], r["times_to_this_checkpoint"]) for r in rollbacks] == [(0, 1), (0, 2)]
    assert rollbacks[0]["step"] > 2  # the first spike came after the detector's warmup, before any periodic save


def test_imported_parameters_start_training_like_a_reset_optimizer(tmp_path):
    """A parameters-only checkpoint (what task=import_hf writes) is a valid trainer.init_from:
    its first step sees the same model and data as continuing the source run's checkpoint
    with trainer.reset_optimizer=true, so both log the same first loss."""
    from flax import nnx

    from xgen import checkpoint
    from xgen.generate.load import model_config_of
    from xgen.model.transformer import XGenModel

    source = tmp_path / "source"
    source.mkdir()
    run_task(compose_config(*FAST, "trainer.steps=3"), source)
    model_cfg = model_config_of(source)
    abstract = nnx.state(nnx.eval_shape(lambda: XGenModel(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = checkpoint.restore_params(source, abstract)
    checkpoint.save_params(tmp_path / "imported", params, {"config": {"model": dataclasses.asdict(model_cfg)}})
    assert not checkpoint.has_optimizer_state(tmp_path / "imported") and checkpoint.has_optimizer_state(source)

    runs = {}
    for name, init in (("from_import", "imported"), ("reset", "source")):
        run_dir = tmp_path / name
        run_dir.mkdir()
        extra = ("trainer.reset_optimizer=true",) if name == "reset" else ()
        run_task(compose_config(*FAST, "trainer.steps=2", "trainer.log_every=1", f"trainer.init_from={tmp_path / init}", *extra), run_dir)
        runs[name] = metrics(run_dir)
    assert sorted(runs["from_import"]) == [1, 2]  # an import starts at step 0
    assert sorted(runs["reset"]) == [4, 5]  # a run's checkpoint continues its step count
    assert runs["from_import"][1][0] == pytest.approx(runs["reset"][4][0], rel=1e-6)


def test_a_corrupt_checkpoint_is_refused_in_one_line_and_left_in_place(tmp_path):
    args = [sys.executable, "-m", "xgen.run", *FAST, "trainer.steps=2", f"hydra.run.dir={tmp_path}"]
    assert subprocess.run(args, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    state = tmp_path / "checkpoints" / "2" / "state"
    victims = sorted(p for p in state.rglob("*") if p.is_file() and p.stat().st_size > 1000)
    assert victims
    for victim in victims:
        victim.write_bytes(b"\0garbage" * 64)
    longer = [*args[:-2], "trainer.steps=4", "trainer.allow_changes=[trainer.steps]", args[-1]]  # past the config check
    proc = subprocess.run(longer, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xgen: config error: checkpoint") and "/2" in lines[0], proc.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "2").is_dir() and not (tmp_path / "checkpoints" / "4").exists()


def test_a_params_only_start_holds_the_parameters_and_adams_moments_only(tmp_path):
    """Peak memory of a params-only `init_from` (SFT, imported weights), from the compiled
    constructor: the restored parameters are donated into the state, so only Adam's two
    moments are new; no random state is built beside them (that was 6x the parameters)."""
    import jax

    from xgen.train.trainer import Trainer

    trainer = Trainer(compose_config(*FAST, "trainer.steps=1"), tmp_path)
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state.params))
    memory = trainer.from_params.lower(trainer.abstract_state.params).compile().memory_analysis()
    assert memory.argument_size_in_bytes == memory.alias_size_in_bytes == params_bytes
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
    assert 3 * params_bytes <= peak <= 3 * params_bytes + 4096  # parameters + mu + nu, and a few scalars


def test_a_run_resumes_across_the_layer_layout(tmp_path):
    """A run checkpointed unrolled continues scanned (execution may change on a resume):
    the checkpoint's per-layer arrays are stacked on restore, and the steps after it equal
    an uninterrupted run's up to float rounding."""
    run = ("trainer.log_every=1", "optimizer.decay_steps=4", *FAST)
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_task(compose_config("trainer.steps=4", *run), whole)
    run_task(compose_config("trainer.steps=2", *run), split)
    run_task(compose_config("trainer.steps=4", "execution.scan_layers=true", *run), split)
    want, got = metrics(whole), metrics(split)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):  # the loss to float rounding; the gradient norm sums a different order
        np.testing.assert_allclose(got[step][0], want[step][0], rtol=1e-5)
        np.testing.assert_allclose(got[step][1], want[step][1], rtol=5e-4)
