"""Trackers: where train and eval scalars are mirrored besides metrics.jsonl and eval.jsonl.

The JSON Lines files are the run's record (tests, `task=plot` and `task=report` read them);
a tracker is a view of them for people: TensorBoard event files (tensorboardX, no
TensorFlow) or a Weights & Biases run. Chosen by the `tracker` config group
(`tracker=[tensorboard,wandb]` for both); each gets the resolved config and provenance.json
once, then scalars under `train/<key>` and `eval/<key>` at the training step.

Steps only go forward in a tracker's eyes, while a run may go back: a resume continues from
its newest checkpoint (steps after it are trained again) and a spike rollback returns to an
older one. TensorBoard is told to purge the events past that step (`purge_step`); W&B refuses
a step below one it already has, so those replayed steps are not sent to it, and a warning
says so once per return (metrics.jsonl holds the run as it went on).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Protocol

from xgen.config import ConfigError
from xgen.config.schema import TensorBoardConfig, TrackerConfig, WandbConfig

log = logging.getLogger(__name__)

# The W&B run id, kept in the run directory so that a restart continues the same W&B run.
WANDB_ID_FILE = "wandb_id"


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def rewind(self, step: int) -> None:
        """The run went back to `step` (a rollback): the steps after it will be logged again."""

    def close(self) -> None: ...


def open_trackers(cfg: TrackerConfig, run_dir: Path, config: dict[str, Any], resume_step: int) -> list[Tracker]:
    """The trackers `cfg` selects, each started with `config` (the resolved config plus
    provenance); a tracker that cannot start is a ConfigError, and those already started are
    closed."""
    opened: list[Tracker] = []
    try:
        if cfg.tensorboard is not None:
            opened.append(TensorBoardTracker(cfg.tensorboard, run_dir, config, resume_step))
        if cfg.wandb is not None:
            opened.append(WandbTracker(cfg.wandb, run_dir, config, resume_step))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened


def run_config(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """What a tracker records about the run: the resolved config (a dataclass tree or a
    dict) as plain JSON values, provenance.json's record (written by xgen.run; collected here
    when the trainer runs without it) and the run directory."""
    from xgen import provenance

    plain = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
    record = json.loads(json.dumps(plain, default=str))
    task = getattr(getattr(cfg, "task", None), "name", "pretrain")
    record["provenance"] = provenance.read(run_dir) or provenance.collect(uses_devices=True, task=task)
    record["run_directory"] = str(run_dir)  # not "run_dir": a config key of its own (task=plot's input)
    return record


class TensorBoardTracker:
    """Event files in <run dir>/tensorboard: the config and provenance as text summaries,
    the scalars by step. Each start and each rewind opens a new file whose first event purges
    the later steps of the earlier files (tensorboardX's purge_step), so TensorBoard shows the
    run as it went on."""

    def __init__(self, cfg: TensorBoardConfig, run_dir: Path, config: dict[str, Any], resume_step: int):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("tracker=tensorboard needs tensorboardX: pip install 'xgen[tensorboard]'") from None
        self._open = lambda step: SummaryWriter(str(run_dir / "tensorboard"), flush_secs=cfg.flush_secs, purge_step=step + 1)
        self._writer = self._open(resume_step)
        setup = {k: v for k, v in config.items() if k != "provenance"}
        # Markdown: four spaces make a code block, so the JSON keeps its indentation.
        for name, value in (("config", setup), ("provenance", config.get("provenance"))):
            text = json.dumps(value, indent=1, default=str)
            self._writer.add_text(name, "".join("    " + line + "\n" for line in text.splitlines()), resume_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)

    def rewind(self, step: int) -> None:
        self._writer.close()
        self._writer = self._open(step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A W&B run in <run dir>/wandb, with the id in <run dir>/wandb_id and resume="allow", so
    a restarted run continues the same W&B run. Its config is the resolved config plus
    provenance; scalars are logged at the training step (`step=`)."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], resume_step: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError("tracker=wandb needs wandb: pip install 'xgen[wandb]'") from None
        run_id = wandb_run_id(run_dir, cfg.id)
        try:
            self._run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or f"{run_dir.parent.name}/{run_dir.name}",
                tags=list(cfg.tags),
                group=cfg.group,
                notes=cfg.notes,
                mode=str(cfg.mode),
                save_code=cfg.save_code,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config,
                # A resume may change keys that do not change the run (cadence, trainer.steps...).
                allow_val_change=True,
                # The console is xgen's (xgen.console) and run.log already holds it; W&B's
                # capture would wrap sys.stdout and sys.stderr under it. quiet: no table of
                # every metric at the end (the sync command is logged below instead).
                settings=wandb.Settings(console="off", quiet=True),
            )
        except Exception as ex:  # noqa: BLE001 - any failure to start is this one line, before the first step
            first = str(ex).strip().splitlines()[0].rstrip(".") if str(ex).strip() else type(ex).__name__
            hint = "; tracker.wandb.mode=offline writes the run into the run directory" if cfg.mode == "online" else ""
            raise ConfigError(f"tracker=wandb (mode {cfg.mode}) could not start W&B run {run_id}: {first}{hint}") from None
        # W&B's next step: 0 for a new run (and any offline one), past the last logged step
        # for a resumed online run. A step below it would be refused.
        self._floor = int(getattr(self._run, "starting_step", 0) or 0)
        self._last: int | None = None
        self._warned = False
        self._mode = cfg.mode
        log.info("W&B run %s (%s) in %s", run_id, cfg.mode, run_dir / "wandb")

    def log(self, scalars: dict[str, float], step: int) -> None:
        if step < self._floor:
            if not self._warned:
                log.warning(
                    "W&B run %s already holds steps up to %d: steps %d to %d, trained again after going back to a "
                    "checkpoint, are not sent to it (W&B refuses steps going backwards); metrics.jsonl holds them",
                    self._run.id, self._floor - 1, step, self._floor - 1,
                )  # fmt: skip
                self._warned = True
            return
        self._run.log(scalars, step=step)
        self._last = step
        self._floor = step  # later records at this same step (an evaluation) join its row

    def rewind(self, step: int) -> None:
        if self._last is not None and step < self._last:
            self._floor = self._last + 1
            self._warned = False

    def close(self) -> None:
        # Closed while an exception unwinds (the trainer's ExitStack): the W&B run is marked failed.
        self._run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
        if self._mode == "offline":
            log.info("W&B run %s is offline: `wandb sync %s` uploads it", self._run.id, Path(self._run.dir).parent)


def wandb_run_id(run_dir: Path, configured: str | None) -> str:
    """The W&B run id of `run_dir`: `configured` when set, else the one stored in the run
    directory, else a new random one (not a hash of the path: two machines' run directories
    can share a path, and would then share one W&B run). Stored in the run directory either
    way, so a restart, or a copy of the directory, continues that W&B run."""
    path = run_dir / WANDB_ID_FILE
    stored = path.read_text().strip() if path.exists() else None
    run_id = configured or stored or secrets.token_hex(8)
    if run_id != stored:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(run_id + "\n")
        os.replace(partial, path)
    return run_id
