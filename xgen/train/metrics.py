"""Step metrics (clu.metrics) and where they go: metrics.jsonl, eval.jsonl, the console, trackers.

`clu.metric_writers` would bring TensorFlow (over 1 GB) into every install, so xgen writes
its own JSON Lines files (the record a run is judged by) and mirrors their scalars to the
trackers the `tracker` group selects (TensorBoard, W&B: xgen/train/trackers.py).
"""

# No `from __future__ import annotations`: clu reads the metric classes from the annotations.

import json
import logging
import os
from pathlib import Path
from typing import Any

from clu import metrics as clu_metrics
from flax import struct

from xgen.config.schema import TrackerConfig
from xgen.train.trackers import Tracker, open_trackers, run_config

log = logging.getLogger(__name__)


@struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Averaged over the steps between two log lines; the learning rate is the last step's."""

    loss: clu_metrics.Average.from_output("loss")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    param_norm: clu_metrics.LastValue.from_output("param_norm")
    learning_rate: clu_metrics.LastValue.from_output("learning_rate")


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl, one per evaluation to
    eval.jsonl, and one per spike, non-finite step or rollback to events.jsonl; mirrors the
    scalars to the trackers (`train/<key>`, `eval/<key>`).

    On resume from step N, records of later steps (logged after that checkpoint, before the
    interruption) are dropped, so each step appears once and the files match the run."""

    def __init__(
        self,
        run_dir: Path,
        *,
        trackers: TrackerConfig | None = None,
        config: Any = None,
        resume_step: int = 0,
        primary: bool = True,
    ):
        """Only the primary process (process 0 of a multi-host job) writes; others are no-ops.
        `config` (the run's resolved config) is what the trackers record about the run, with
        provenance.json; a tracker that cannot start is a ConfigError."""
        self.path = run_dir / "metrics.jsonl"
        self.events_path = run_dir / "events.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        self.primary = primary
        self._trackers: list[Tracker] = []
        if not primary:
            return
        self.path.touch()
        self._file = self.path.open("a", encoding="utf-8")
        self.truncate(resume_step, events=True)
        if trackers is not None and (trackers.tensorboard is not None or trackers.wandb is not None):
            try:
                self._trackers = open_trackers(trackers, run_dir, run_config(config, run_dir), resume_step)
            except BaseException:
                self._file.close()
                raise

    def write(self, record: dict[str, Any]) -> None:
        if not self.primary:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._mirror("train", record)

    def write_eval(self, record: dict[str, Any]) -> None:
        """One evaluation at `record["step"]`: {"step": N, "heldout/loss": ..., "heldout/<source>/loss": ...,
        "<benchmark>/<task>/<metric>": ...}, appended to eval.jsonl (cut back on resume and
        rollback like metrics.jsonl) and sent to the trackers as `eval/<key>`."""
        if not self.primary:
            return
        with self.eval_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self._mirror("eval", record)

    def _mirror(self, prefix: str, record: dict[str, Any]) -> None:
        """The record's numbers (not None, not the step) to every tracker at its step."""
        scalars = {f"{prefix}/{key}": value for key, value in record.items() if key != "step" and isinstance(value, (int, float))}
        if scalars:
            for tracker in self._trackers:
                tracker.log(scalars, int(record["step"]))

    def truncate(self, step: int, events: bool = False) -> None:
        """Drop records after `step`, and with `events` events too (a resume returns there and
        replays them; a rollback keeps the events that caused it): each step stays logged once. Each file is rewritten beside itself and renamed over the old one,
        so a kill at any moment leaves the old file or the new one, never an empty one."""
        if not self.primary:
            return
        self._file.close()
        _keep_until(self.path, step)
        if self.eval_path.exists():
            _keep_until(self.eval_path, step)
        if events and self.events_path.exists():
            _keep_until(self.events_path, step)
        self._file = self.path.open("a", encoding="utf-8")
        for tracker in self._trackers:
            tracker.rewind(step)

    def event(self, record: dict[str, Any]) -> None:
        if not self.primary:
            return
        with self.events_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if not self.primary:
            return
        self._file.close()
        for tracker in self._trackers:
            tracker.close()


def _keep_until(path: Path, step: int) -> None:
    """`path`'s JSON lines whose step is at most `step`; a torn last line (a kill mid-write) is
    dropped with a warning."""
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if torn:
        log.warning("%s: %d unreadable line(s) (a write cut short) dropped", path, torn)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in kept))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def progress_line(record: dict[str, Any], total_steps: int, eta_s: float) -> str:
    """The console line: step, loss, learning rate, gradient norm, throughput, MFU (when the
    hardware states its peak), ETA."""
    eta = f"{int(eta_s // 3600)}:{int(eta_s % 3600 // 60):02d}:{int(eta_s % 60):02d}"
    mfu = f" | MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
    return (
        f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} | lr {record['learning_rate']:.2e} | "
        f"gnorm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s{mfu} | ETA {eta}"
    )


class SequenceTrace:
    """`data_trace/process-<p>.jsonl`: each step's sequence ids (their index in the data
    mixture) as this process read them, written only when the data carries them
    (`loader.trace_sequences`). Cut back to the resumed step like metrics.jsonl, so the
    file lists what the run's model was trained on, once per step."""

    def __init__(self, run_dir: Path, process_index: int, resume_step: int):
        self.path = run_dir / "data_trace" / f"process-{process_index}.jsonl"
        self._file = None
        if self.path.exists():
            _keep_until(self.path, resume_step)

    def write(self, step: int, ids) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps({"step": step, "ids": [int(i) for i in ids]}) + "\n")
        self._file.flush()

    def truncate(self, step: int) -> None:
        """A rollback: the steps after `step` no longer count."""
        if self._file is None:
            return
        self._file.close()
        _keep_until(self.path, step)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
