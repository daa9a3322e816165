"""Orbax checkpoints of the train state, the data iterator's state and the run's config.

Orbax writes tensorstore arrays into a temporary directory and renames it when complete,
so a crash mid-save leaves the previous checkpoint as the latest usable one. Saves run
asynchronously while training continues.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
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


def _unreadable(ex: BaseException) -> str:
    """Why a checkpoint could not be restored, in one line: damaged files, or another model."""
    first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
    first = first.split(" [tensorstore_spec")[0]
    damaged = "DATA_LOSS" in first or "checksum" in first or type(ex).__name__ == "JSONDecodeError"
    if damaged:
        return f"is damaged (its files fail their checks; an older step or a fresh run dir is needed): {first}"
    return f"does not match this run's model or optimizer: {first}"


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
        raise ConfigError(f"checkpoint {mngr.directory}/{step} {_unreadable(ex)}") from None
    log.info("restored checkpoint %s/%d", mngr.directory, step)
    return restored.state, restored.data, step


# Model-only access, for inference, conversion and `trainer.init_from`: a training checkpoint
# holds `state` = TrainState (params, opt_state, step, stats); an imported one (task=import_hf)
# holds `state` = {"params": ...} alone. Both carry `meta` = {"config": {"model": ...}, ...}.


def newest(path: str | Path) -> tuple[Path, int]:
    """(checkpoints directory, newest complete step) of a run dir or checkpoints dir."""
    directory = checkpoints_dir(path)
    step = latest_step(directory)
    if step is None:
        raise ConfigError(f"checkpoint={path}: no complete checkpoint there")
    return directory, step


def read_meta(path: str | Path) -> dict:
    """The newest checkpoint's JSON metadata (the resolved config it was written with)."""
    directory, step = newest(path)
    with open_manager(directory, read_only=True) as mngr:
        return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def has_optimizer_state(path: str | Path) -> bool:
    """Whether the newest checkpoint can continue training (else it holds parameters only)."""
    return not read_meta(path).get("params_only", False)


def restore_params(path: str | Path, abstract_params: Any) -> Any:
    """Only the parameters of the newest checkpoint (a partial restore: optimizer state is not
    read), placed as `abstract_params` (ShapeDtypeStructs with shardings) says."""
    directory, step = newest(path)
    item = {"params": abstract_params}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), item)
    try:
        with open_manager(directory, read_only=True) as mngr:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
                ),
            )
    except (ValueError, KeyError, FileNotFoundError) as ex:
        raise ConfigError(f"checkpoint {directory}/{step} {_unreadable(ex)}") from None
    return restored.state["params"]


def save_params(path: str | Path, params: Any, meta: dict, step: int = 0) -> Path:
    """Write a parameters-only checkpoint under `path`/checkpoints (atomic, like every save)."""
    directory = Path(path) / "checkpoints"
    with open_manager(directory) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}),
                meta=ocp.args.JsonSave({**meta, "params_only": True}),
            ),
            force=True,
        )
        mngr.wait_until_finished()
    return directory
