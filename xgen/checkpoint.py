"""Orbax checkpoints of the train state, the data iterator's state and the run's config.

Orbax writes tensorstore arrays into a temporary directory and renames it when complete,
so a crash mid-save leaves the previous checkpoint as the latest usable one. Saves run
asynchronously while training continues.

What a checkpoint proves: a step directory counts only if orbax committed it (its commit
record names a commit time); every array's fingerprint, taken on the device at save, is
stored in its metadata with a copy of the data position, and both are checked at restore.
A checkpoint that fails either check, or fails to read, is reported in one line and the
newest older one that passes is used; numeric directories orbax did not commit are moved
aside to `stray_checkpoints/` (kept, reported, never trusted).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from xgen.config import ConfigError, StorageError

log = logging.getLogger(__name__)

COMMIT_RECORD = "_CHECKPOINT_METADATA"  # orbax writes it when a step is finalized


def _committed(step_dir: Path) -> bool:
    try:
        record = json.loads((step_dir / COMMIT_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(record, dict) and record.get("commit_timestamp_nsecs")) and (step_dir / "meta").is_dir()


def scan(directory: Path) -> tuple[list[int], list[Path]]:
    """(committed steps, newest first; numeric directories that are not committed checkpoints)."""
    if not directory.is_dir():
        return [], []
    steps, stray = [], []
    for path in directory.iterdir():
        if path.is_dir() and path.name.isdigit():
            if _committed(path):
                steps.append(int(path.name))
            else:
                stray.append(path)
    return sorted(steps, reverse=True), sorted(stray)


def _move_strays(directory: Path) -> None:
    """Numeric directories orbax did not commit, out of its way (orbax would count them)."""
    for path in scan(directory)[1]:
        target = _move_aside(directory, int(path.name), "stray_checkpoints")
        log.warning("checkpoint %s is not one orbax committed (no commit record): moved to %s, not used", path, target)


def open_manager(
    directory: Path, *, keep: int = 1, keep_every: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """Keeps the newest `keep` checkpoints, plus every one whose step is a multiple of `keep_every`."""
    if keep < 1:
        raise ConfigError(f"trainer.checkpoints_to_keep={keep}: at least 1 (the checkpoint a resume starts from)")
    if not read_only:
        _move_strays(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


# ---- fingerprints ----------------------------------------------------------------------


def _as_tree(state: Any) -> Any:
    """A train state as a dict of its fields, so that its parameters sit under the same
    key (`['params']`) as in a parameters-only checkpoint's `{"params": ...}`."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return state


def _fingerprint(x: jax.Array) -> jax.Array:
    """A position-weighted sum of an array's bits (uint32): any changed byte changes it,
    except with probability about 2^-32."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32).ravel()
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32) ^ jnp.uint32(bits.size)


@jax.jit
def _fingerprint_leaves(leaves: list) -> list:
    return [_fingerprint(x) for x in leaves]


def fingerprints(state: Any) -> dict[str, int]:
    """Every array's fingerprint by its key path, computed where the array lives."""
    flat = jax.tree_util.tree_flatten_with_path(_as_tree(state))[0]
    values = jax.device_get(_fingerprint_leaves([leaf for _, leaf in flat]))
    return {jax.tree_util.keystr(path): int(v) for (path, _), v in zip(flat, values)}


def _mismatch(state: Any, recorded: dict[str, int] | None) -> str | None:
    """Which array differs from its fingerprint at save (None: all match, or none recorded)."""
    if not recorded:
        log.warning("checkpoint written before fingerprints: its arrays are restored unverified")
        return None
    for key, value in fingerprints(state).items():
        if key in recorded and recorded[key] != value:
            return f"array {key} differs from the fingerprint taken when it was saved"
    return None


@jax.jit
def _all_finite_leaves(leaves: list) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(state: Any) -> bool:
    """Whether every floating-point array of the state is finite (checked on the device; one
    compiled program per state structure, reused by every save)."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(_all_finite_leaves(leaves)) if leaves else True


# ---- save and restore ------------------------------------------------------------------

# Errors of the storage itself: no retry of the same save can succeed until someone acts.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG, errno.EEXIST}


def check_room(directory: Path, needed_bytes: int) -> None:
    """Before the first step: `directory` takes files and has room for one checkpoint of
    `needed_bytes` (the state's size), so a run never trains for hours to fail at its first save."""
    if directory.exists() and not directory.is_dir():
        raise StorageError(f"checkpoints cannot be written to {directory}: it is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A name no other host's probe can have (pids repeat across containers of a pod).
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.write(fd, b"xgen")
        os.close(fd)
        os.unlink(probe)
    except OSError as ex:
        raise StorageError(f"checkpoints cannot be written to {directory}: {ex.strerror or ex} ({ex.filename or directory})") from None
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise StorageError(
            f"{free / 2**30:.2f} GiB free in {directory}, but one checkpoint of this run takes "
            f"{needed_bytes / 2**30:.2f} GiB: free space there, or write the run elsewhere (hydra.run.dir=...)"
        )


def storage_error(ex: BaseException) -> OSError | None:
    """The storage error behind a failed save, or None. Orbax raises Python's OSError from
    its own threads; tensorstore's writes fail as a ValueError that carries the errno as
    `[os_error_code='28']` and the file in quotes."""
    seen: BaseException | None = ex
    for _ in range(20):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return seen
        code = re.search(r"os_error_code='(\d+)'", str(seen))
        if code and int(code.group(1)) in STORAGE_ERRNOS:
            path = re.search(r'(?:Failed writing|local file|file): "([^"]+)"', str(seen)) or re.search(r'"(/[^"]+)"', str(seen))
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))), path.group(1) if path else None)
        seen = seen.__cause__ or seen.__context__
    return None


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Start an asynchronous save of everything needed to resume at `step`."""
    meta = {**meta, "fingerprints": fingerprints(state), "data_state": data_state}
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
    """The newest committed checkpoint's step under `directory`, or None."""
    steps, stray = scan(directory)
    for path in stray:
        log.warning("checkpoint %s is not one orbax committed (no commit record): ignored", path)
    return steps[0] if steps else None


def checkpoints_dir(run_or_checkpoints: str | Path) -> Path:
    """Accept a run directory or its `checkpoints/` folder."""
    path = Path(run_or_checkpoints)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _first_line(ex: BaseException) -> str:
    first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
    return first.split(" [tensorstore_spec")[0][:300]


def read_meta_at(directory: Path, step: int) -> dict:
    """One checkpoint's JSON metadata (the resolved config it was written with)."""
    try:
        with open_manager(directory, read_only=True) as mngr:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as ex:  # noqa: BLE001 - any failure to read is damage, in one line
        raise ConfigError(f"checkpoint {directory}/{step}: its metadata cannot be read: {_first_line(ex)}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"checkpoint {directory}/{step}: its metadata is not a JSON object")
    return dict(meta)


def _step_mismatch(state: Any, meta: dict, step: int) -> str | None:
    """Whether the checkpoint is another step's under this directory name (a copy, a link, a
    rename): resuming it as `step` would skip or repeat training silently."""
    recorded = meta.get("step")
    held = getattr(state, "step", None) if not isinstance(state, dict) else state.get("step")
    for what, value in (("its metadata records", recorded), ("its train state holds", held)):
        if value is not None and int(value) != step:
            return f"{what} step {int(value)}, not the step {step} its directory is named for"
    return None


class ShapeMismatch(ConfigError):
    """The checkpoint holds arrays of other shapes or names than this run's model: not damage
    (an older checkpoint would not fit either), a refusal."""


def _path_name(path: tuple) -> str:
    """A key path as dotted names, whatever the tree's node types (dicts, dataclasses, lists);
    nnx's trailing `value` dropped so that both sides name a parameter alike."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(names[:-1] if names and names[-1] == "value" else names)


def shape_differences(step_dir: Path, abstract_state: Any, shown: int = 4) -> str | None:
    """What differs between the arrays stored in a step and the ones this run restores into,
    by key (None: the same keys and shapes, or the stored tree cannot be read)."""
    try:
        from etils import epath

        stored = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir / "state"))
    except Exception:  # noqa: BLE001 - unreadable metadata is damage, reported by the restore
        return None
    shapes = lambda tree: {  # noqa: E731
        _path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")
    }
    disk, now = shapes(stored), shapes(_as_tree(abstract_state))
    order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params."), k))  # noqa: E731 - parameters first
    parts = []
    differ = [f"{k} {disk[k]} stored, {now[k]} here" for k in order(disk.keys() & now.keys()) if disk[k] != now[k]]
    for what, keys in (("shapes differ", differ), ("only stored", order(disk.keys() - now.keys())), ("only here", order(now.keys() - disk.keys()))):
        if keys:
            parts.append(f"{what}: {', '.join(keys[:shown])}" + (f" and {len(keys) - shown} more" if len(keys) > shown else ""))
    return "; ".join(parts) or None


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) of one step, checked against its fingerprints; raises on damage."""
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
    except Exception as ex:  # noqa: BLE001 - truncated, deleted or garbled files
        differences = shape_differences(Path(mngr.directory) / str(step), abstract_state)
        if differences:
            raise ShapeMismatch(
                f"checkpoint {mngr.directory}/{step} holds another model than this command's ({differences}); "
                "rerun with the model it was trained with, or start a new run directory"
            ) from None
        raise ConfigError(f"checkpoint {mngr.directory}/{step} cannot be read: {_first_line(ex)}") from None
    meta = restored.meta
    if not isinstance(meta, dict):
        raise ConfigError(f"checkpoint {mngr.directory}/{step}: its metadata is not a JSON object")
    problem = _step_mismatch(restored.state, meta, step) or _mismatch(restored.state, meta.get("fingerprints"))
    if problem is None and "data_state" in meta and restored.data != meta["data_state"]:
        problem = f"its data position {restored.data} differs from the one recorded at save {meta['data_state']}"
    if problem:
        raise ConfigError(f"checkpoint {mngr.directory}/{step} is damaged: {problem}")
    return restored.state, restored.data, meta


def _move_aside(directory: Path, step: int, folder: str) -> Path:
    target = directory.parent / folder / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(directory / str(step)), target)
    return target


def restore_latest(
    mngr: ocp.CheckpointManager,
    abstract_state: Any,
    on_damaged: Callable[[int, str], None] | None = None,
    move_damaged: bool = False,
) -> tuple[Any, dict, int, dict] | None:
    """(state, data_state, step, meta) of the newest committed checkpoint that reads and passes its
    checks, or None if there is none. A damaged one is reported (`on_damaged(step, why)`)
    and the next older one tried; if every one is damaged, that is an error.

    `abstract_state` holds ShapeDtypeStructs with shardings: arrays land where they say,
    whatever mesh wrote them. With `move_damaged` (the run's own, writable manager), a damaged
    step directory is moved to `damaged_checkpoints/` beside it: kept for inspection, out of
    the way of the step that will be saved again."""
    directory = Path(mngr.directory)
    steps, _ = scan(directory)
    problems, damaged, first = [], [], None
    for step in steps:
        try:
            state, data, meta = _restore_step(mngr, step, abstract_state)
        except ConfigError as ex:  # a ShapeMismatch too: damage to the metadata looks alike
            log.error("%s; trying the checkpoint before it", ex)
            problems.append(str(ex))
            first = first or ex
            damaged.append((step, str(ex)))
            continue
        for bad, why in damaged:  # only once a good one is found: a run that fails keeps them all in place
            if move_damaged:
                why += f" (moved to {_move_aside(directory, bad, 'damaged_checkpoints')})"
            if on_damaged is not None:
                on_damaged(bad, why)
        if damaged and move_damaged:
            mngr.reload()
        log.info("restored checkpoint %s/%d", mngr.directory, step)
        return state, data, step, meta
    if problems:
        more = f" (and {len(problems) - 1} older ones)" if len(problems) > 1 else ""
        kind = ShapeMismatch if isinstance(first, ShapeMismatch) else ConfigError
        raise kind(f"{problems[0]}{more}; no checkpoint in {mngr.directory} can be restored")
    return None


# Model-only access, for inference, conversion and `trainer.init_from`: a training checkpoint
# holds `state` = TrainState (params, opt_state, step, stats); an imported one (task=import_hf)
# holds `state` = {"params": ...} alone. Both carry `meta` = {"config": {"model": ...}, ...}.


def newest(path: str | Path) -> tuple[Path, int]:
    """(checkpoints directory, newest committed step) of a run dir or checkpoints dir."""
    directory = checkpoints_dir(path)
    step = latest_step(directory)
    if step is None:
        raise ConfigError(f"checkpoint={path}: no complete checkpoint there")
    return directory, step


def read_meta(path: str | Path) -> dict:
    """The newest checkpoint's JSON metadata (the resolved config it was written with)."""
    return read_meta_at(*newest(path))


def has_optimizer_state(path: str | Path) -> bool:
    """Whether the newest checkpoint can continue training (else it holds parameters only)."""
    return not read_meta(path).get("params_only", False)


def restore_params(path: str | Path, abstract_params: Any) -> Any:
    """Only the parameters of the newest checkpoint (a partial restore: optimizer state is not
    read), placed as `abstract_params` (ShapeDtypeStructs with shardings) says, and checked
    against their fingerprints."""
    directory, step = newest(path)
    meta = read_meta_at(directory, step)
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
    except Exception as ex:  # noqa: BLE001 - another model, or damaged files: one line
        raise ConfigError(f"checkpoint {directory}/{step} cannot be read as this model's parameters: {_first_line(ex)}") from None
    params = restored.state["params"]
    problem = _step_mismatch({}, meta, step) or _mismatch({"params": params}, meta.get("fingerprints"))
    if problem:
        raise ConfigError(f"checkpoint {directory}/{step} is damaged: {problem}")
    return params


def save_params(path: str | Path, params: Any, meta: dict, step: int = 0) -> Path:
    """Write a parameters-only checkpoint under `path`/checkpoints (atomic, like every save)."""
    directory = Path(path) / "checkpoints"
    meta = {**meta, "params_only": True, "fingerprints": fingerprints({"params": params})}
    with open_manager(directory) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        mngr.wait_until_finished()
    return directory
