"""Trackers (the `tracker` group): a real training run's offline W&B run holds the resolved
config, provenance.json and the train metrics by step, and a restart continues the same W&B
run; `MetricsLog.write_eval` reaches eval.jsonl and every tracker; going back to an earlier
step (resume, rollback) cuts eval.jsonl, purges TensorBoard's later steps and never crashes
W&B; a missing tracker package is one line before any work.

The W&B and TensorBoard files are read back as written, with no server: W&B's run file is
LevelDB's log format holding `wandb_internal.proto` records, TensorBoard's is TFRecords
holding `Event`s. WANDB_MODE=offline is set for every W&B run here, on top of the config's
own offline default, so nothing can reach the network.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.config.schema import TensorBoardConfig, TrackerConfig, WandbConfig
from xgen.train.metrics import MetricsLog

REPO = Path(__file__).resolve().parents[2]
OFFLINE = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


# W&B's run file: a 7-byte header, then LevelDB log blocks of 32 KiB, each record cut into
# chunks with a 7-byte header (CRC-32 of the type byte and data, length, type: full, first,
# middle, last).
WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == WANDB_HEADER, data[:7]
    records, parts, pos = [], [], 7
    while pos < len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: damaged at {pos}"
        assert kind in (1, 2, 3, 4), kind
        parts.append(chunk)
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


@dataclasses.dataclass
class WandbRun:
    run_id: str
    config: dict
    history: dict[int, dict]  # step -> {key: value}


def wandb_runs(run_dir: Path) -> list[WandbRun]:
    """Each offline W&B session in the run directory, oldest first: its run id, its config
    (the run record's, with later updates) and its history rows by step."""
    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, config, history = None, {}, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
        config.pop("_wandb", None)
        runs.append(WandbRun(run_id, config, history))
    return runs


def tensorboard_events(run_dir: Path) -> list:
    """Every event of the run's TensorBoard files, in the order they were written (TFRecords:
    length, its CRC, data, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def scalars(events: list, tag: str) -> list[tuple[int, float]]:
    return [(e.step, v.simple_value) for e in events for v in e.summary.value if v.tag == tag]


def texts(events: list, tag: str) -> list[str]:
    return [v.tensor.string_val[0].decode() for e in events for v in e.summary.value if v.tag.startswith(tag)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def xgen_run(run_dir: Path, *overrides: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xgen.run", "debug=fast", *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env or OFFLINE,
    )  # fmt: skip


@pytest.mark.slow
def test_a_training_runs_offline_wandb_run_holds_the_resolved_config_provenance_and_train_metrics_a_restart_continues_it(
    tmp_path,
):
    pytest.importorskip("wandb")
    overrides = ("tracker=wandb", "tracker.wandb.tags=[smoke]", "optimizer.decay_steps=5")
    first = xgen_run(tmp_path, *overrides, "trainer.steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = wandb_runs(tmp_path)
    assert run.run_id == (tmp_path / "wandb_id").read_text().strip()

    # The config the trainer ran (the resolved config), key for key, and provenance.json.
    want = json.loads(json.dumps(dataclasses.asdict(compose_config("debug=fast", *overrides, "trainer.steps=3")), default=str))
    got = {k: v for k, v in run.config.items() if k not in ("provenance", "run_directory")}
    assert got == want
    assert run.config["provenance"] == json.loads((tmp_path / "provenance.json").read_text())
    assert run.config["run_directory"] == str(tmp_path)

    losses = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert sorted(losses) == [1, 2, 3]
    assert {step: row["train/loss"] for step, row in run.history.items()} == losses
    assert all({"train/learning_rate", "train/grad_norm", "train/tokens_per_s"} <= set(row) for row in run.history.values())

    # Run again, longer: the same W&B run id, a second session holding steps 4 and 5.
    second = xgen_run(tmp_path, *overrides, "trainer.steps=5", "trainer.allow_changes=[trainer.steps]")
    assert second.returncode == 0, second.stderr[-3000:]
    before, after = wandb_runs(tmp_path)
    assert before == run and after.run_id == run.run_id
    assert after.config["trainer"]["steps"] == 5
    losses = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert {step: row["train/loss"] for step, row in after.history.items()} == {4: losses[4], 5: losses[5]}


def test_tensorboard_holds_the_config_and_the_train_scalars_by_step(tmp_path):
    pytest.importorskip("tensorboardX")
    from xgen.tasks import run_task

    run_task(compose_config("trainer.steps=2", "tracker=tensorboard", "debug=fast"), tmp_path)
    events = tensorboard_events(tmp_path)
    losses = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert [step for step, _ in losses] == [1, 2]
    assert scalars(events, "train/loss") == pytest.approx(losses)  # float32 in the event file
    (config,) = texts(events, "config")
    assert json.loads(config.replace("\n    ", "\n"))["trainer"]["steps"] == 2


def close(log: MetricsLog) -> None:
    """Close the log, then W&B's service: `finish()` returns before W&B's background writer
    has written the run file of a second run in one process; the service's teardown waits
    for it (a training process does this at exit)."""
    import wandb

    log.close()
    wandb.teardown()


def eval_record(step: int, loss: float) -> dict:
    return {"step": step, "heldout/loss": loss, "heldout/python_docs/loss": loss - 0.5, "zeroshot/arc_easy/acc": 0.25}


def test_write_eval_appends_to_eval_jsonl_and_reaches_every_tracker_and_a_resume_cuts_it_back(tmp_path, offline):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("wandb")
    trackers = TrackerConfig(tensorboard=TensorBoardConfig(), wandb=WandbConfig())
    cfg = compose_config("debug=fast", "tracker=[tensorboard,wandb]")
    log = MetricsLog(tmp_path, trackers=trackers, config=cfg)
    for step in range(1, 5):
        log.write({"step": step, "loss": 10.0 - step, "mfu": None})
        if step % 2 == 0:
            log.write_eval(eval_record(step, 8.0 - step))
    close(log)
    assert read_jsonl(tmp_path / "eval.jsonl") == [eval_record(2, 6.0), eval_record(4, 4.0)]
    (run,) = wandb_runs(tmp_path)
    assert run.history[2] == {"train/loss": 8.0, "eval/heldout/loss": 6.0, "eval/heldout/python_docs/loss": 5.5,
                              "eval/zeroshot/arc_easy/acc": 0.25}  # fmt: skip
    assert run.history[3] == {"train/loss": 7.0}
    events = tensorboard_events(tmp_path)
    assert scalars(events, "eval/heldout/loss") == [(2, 6.0), (4, 4.0)]
    assert scalars(events, "eval/zeroshot/arc_easy/acc") == [(2, 0.25), (4, 0.25)]

    # Resumed from a checkpoint at step 3: step 4's evaluation is gone from eval.jsonl, and
    # evaluated again with the resumed run's numbers; TensorBoard purges steps from 4 on.
    log = MetricsLog(tmp_path, trackers=trackers, config=cfg, resume_step=3)
    assert read_jsonl(tmp_path / "eval.jsonl") == [eval_record(2, 6.0)]
    log.write({"step": 4, "loss": 5.5})
    log.write_eval(eval_record(4, 3.0))
    close(log)
    assert read_jsonl(tmp_path / "eval.jsonl") == [eval_record(2, 6.0), eval_record(4, 3.0)]
    events = tensorboard_events(tmp_path)
    purges = [e.step for e in events if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges[-1] == 4
    first, resumed = wandb_runs(tmp_path)
    assert resumed.run_id == first.run_id and resumed.history[4]["eval/heldout/loss"] == 3.0


def test_a_rollback_cuts_eval_jsonl_and_the_steps_wandb_already_holds_are_not_sent_again(tmp_path, offline, caplog):
    pytest.importorskip("wandb")
    log = MetricsLog(tmp_path, trackers=TrackerConfig(wandb=WandbConfig()), config=compose_config("debug=fast"))
    for step in range(1, 5):
        log.write({"step": step, "loss": float(step)})
        log.write_eval({"step": step, "heldout/loss": float(step)})
    with caplog.at_level(logging.WARNING, logger="xgen.train.trackers"):
        log.truncate(2)  # a rollback to the checkpoint of step 2
        for step in range(3, 6):
            log.write({"step": step, "loss": step + 0.5})
    close(log)
    assert [r["step"] for r in read_jsonl(tmp_path / "eval.jsonl")] == [1, 2]
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 3.5, 4.5, 5.5]
    (run,) = wandb_runs(tmp_path)
    assert {step: row["train/loss"] for step, row in run.history.items()} == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.5}
    warned = [r.getMessage() for r in caplog.records if "W&B run" in r.getMessage()]
    assert len(warned) == 1 and "steps 3 to 4" in warned[0], warned


def test_a_missing_wandb_package_is_one_line_before_any_work(tmp_path):
    hidden = tmp_path / "hidden"
    (hidden / "wandb").mkdir(parents=True)
    (hidden / "wandb" / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    env = {**OFFLINE, "PYTHONPATH": os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))}
    run_dir = tmp_path / "run"
    proc = xgen_run(run_dir, "tracker=wandb", env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "tracker=wandb needs wandb" in lines[0] and lines[0].endswith("pip install 'xgen[wandb]'"), lines[0]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
