"""Orbax checkpoints of the train state, the data iterator's state and the run's config.

Orbax writes tensorstore arrays into a temporary directory and renames it when complete,
so a crash mid-save leaves the previous checkpoint as the latest usable one. Saves run
asynchronously while training continues.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from xgen.config import ConfigError

log = logging.getLogger(__name__)


def open_manager(
    directory: Path, *, keep: int = 1, keep_every: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """Keeps the newest `keep` checkpoints, plus every one whose step is a multiple of `keep_every`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Start an asynchronous save of everything needed to resume at `step`."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def latest_step(directory: Path) -> int | None:
    """The newest complete checkpoint's step under `directory`, or None."""
    if not directory.is_dir():
        return None
    with open_manager(directory, read_only=True) as mngr:
        return mngr.latest_step()


def checkpoints_dir(run_or_checkpoints: str | Path) -> Path:
    """Accept a run directory or its `checkpoints/` folder."""
    path = Path(run_or_checkpoints)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict, int] | None:
    """(state, data_state, step) of the newest complete checkpoint, or None if there is none.

    `abstract_state` holds ShapeDtypeStructs with shardings: arrays land where they say,
    whatever mesh wrote them."""
    step = mngr.latest_step()
    if step is None:
        return None
    try:
        restored = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        )
    except (ValueError, KeyError, FileNotFoundError) as ex:
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise ConfigError(f"checkpoint {mngr.directory}/{step} does not match this run's model or optimizer: {first}")
    log.info("restored checkpoint %s/%d", mngr.directory, step)
    return restored.state, restored.data, step
