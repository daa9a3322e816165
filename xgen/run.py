"""`python -m xgen.run`: compose the config with Hydra, validate it, dispatch on `task.name`.

This module imports no JAX: the hardware config may need to set XLA_FLAGS (virtual CPU
devices) before JAX starts, and `--cfg job` should print a TPU pod's config instantly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from xgen import provenance, run_lock
from xgen.config import ConfigError, register_configs, to_object
from xgen.config.validate import validate
from xgen.console import exit_now, unraisable_to_run_log
from xgen.objective import objective
from xgen.tasks import LOCAL_TASKS, owns_run_dir, run_task
from xgen.xla_logs import quiet_cpu_compiler

register_configs()

# Set HYDRA_FULL_ERROR=1 yourself to see full tracebacks for config errors too.
_USER_WANTS_TRACES = "HYDRA_FULL_ERROR" in os.environ
# The top-level conf/, installed as the package xgen.conf (setup.py): found the same way in
# a source checkout, an editable install and a wheel.
_CONFIG_PATH = "pkg://xgen.conf"


def _config_error_line(ex: BaseException) -> str | None:
    """One readable line for a config mistake, or None if `ex` is not one."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(ex, AssertionError) and "Unexpected type for root: NoneType" in str(ex):
        return _key_of_unselected_group()  # OmegaConf's assertion, under Hydra's override
    if not isinstance(ex, (HydraException, OmegaConfBaseException, ConfigError)):
        return None
    parts = []
    seen: BaseException | None = ex
    while seen is not None:
        first = str(seen).strip().splitlines()[0].strip() if str(seen).strip() else ""
        if first and first not in parts:
            parts.append(first)
        seen = seen.__cause__
    line = ": ".join(parts) or type(ex).__name__
    bad = _unparsable_override() if type(ex).__name__ == "OverrideParseException" else None
    if bad and bad not in line:
        line = f"cannot parse override {bad!r} (quote values with spaces or brackets: key='...'): {line}"
    misspelt = re.search(r"Could not override '([\w.]+)'", line)
    if misspelt and "not in" in line:
        from xgen.config.store import closest_key

        close = closest_key(misspelt.group(1))
        if close:
            line += f" (did you mean {close}?)"
    if isinstance(ex, MissingConfigException) and ex.options:
        line += f" (available: {', '.join(sorted(ex.options))})"
    return line


# Groups selected as nothing by default (conf/config.yaml), and the tracker's two members.
_UNSELECTED_BY_DEFAULT = {"sft": "sft", "eval": "eval", "tracker.wandb": "tracker", "tracker.tensorboard": "tracker"}


def _key_of_unselected_group() -> str:
    """`tracker.wandb.project=p` without `tracker=wandb` (or `sft.epochs=2` without `sft=...`):
    a key inside a group this command does not select, named in one line."""
    for arg in sys.argv[1:]:
        key = arg.split("=", 1)[0]
        if "=" not in arg or arg.startswith(("-", "+", "~")):
            continue
        for prefix, group in _UNSELECTED_BY_DEFAULT.items():
            if key.startswith(prefix + "."):
                choice = prefix.split(".")[1] if "." in prefix else "<option>"
                return f"{arg} sets a key of the {prefix} config, which this command does not select: add {group}={choice}"
    return "an override sets a key of a config group this command does not select (sft, eval, tracker.wandb): select it first"


def _unparsable_override() -> str | None:
    """The first command-line override Hydra's grammar rejects (its message may not say)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in sys.argv[1:]:
        if arg.startswith("-"):
            continue
        try:
            parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - any refusal marks this one
            return arg
    return None


def _cpu_only_backend(cfg: DictConfig) -> None:
    """Keep JAX from probing backends the hardware does not use: with libtpu installed (the
    `tpu` extra, for task=plan) every start on a CPU or GPU machine would print TPU warnings.
    A GPU config keeps the CPU backend beside CUDA (host-side arrays; and on a machine without
    a GPU, the mesh then refuses it in one line)."""
    platforms = {"cpu": "cpu", "gpu": "cuda,cpu"}.get(str(cfg.hardware.get("platform")))
    if platforms and "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", platforms)


def _set_host_devices(cfg: DictConfig) -> None:
    """Ask XLA for N virtual CPU devices; only effective before JAX is first imported."""
    count = cfg.hardware.get("host_device_count")
    if not count:
        return
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    if "jax" in sys.modules:
        import jax

        if jax.local_device_count() < count and cfg.hardware.platform == "cpu":
            raise ConfigError(
                f"hardware.host_device_count={count} but JAX already started with "
                f"{jax.device_count()} device(s); set XLA_FLAGS={flag} before starting Python"
            )


def _save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """The run's `.hydra/` files (config.yaml, hydra.yaml, overrides.yaml), as Hydra writes
    them, but by the run directory's lock holder only: conf/config.yaml sets
    `hydra.output_subdir: null`, or a refused second command would first overwrite them."""
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (out / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.overrides.task))


def _exit_on_config_error(ex: BaseException) -> None:
    """Print one line and exit 2 if `ex` is a config mistake (and the user did not ask for traces)."""
    line = None if _USER_WANTS_TRACES else _config_error_line(ex)
    if line is None:
        return
    print(f"xgen: {getattr(ex, 'label', ConfigError.label)}: {line}", file=sys.stderr)
    exit_now(2)


def _chips_present(platform: str) -> bool:
    """Whether this machine has the accelerator's device files (checked without starting JAX,
    whose multi-host start would wait for peers or a metadata server that are not there)."""
    import glob

    patterns = {"tpu": ["/dev/accel*", "/dev/vfio/[0-9]*"], "gpu": ["/dev/nvidia[0-9]*", "/dev/dri/renderD*"]}
    return platform == "cpu" or any(glob.glob(p) for p in patterns.get(platform, []))


def _start_distributed(cfg) -> None:
    """JAX's multi-controller runtime, when the hardware says the job spans processes."""
    hw = cfg.hardware
    if not (hw.distributed or hw.coordinator_address) or cfg.task.name in LOCAL_TASKS:
        return
    if not _chips_present(str(hw.platform)):
        raise ConfigError(
            f"hardware={hw.name} is for a multi-host {hw.platform} job but this machine has no {hw.platform} chips; "
            "choose the hardware this machine has (hardware=cpu), or task=plan to compile for it"
        )
    import jax

    try:
        jax.distributed.initialize(
            coordinator_address=hw.coordinator_address, num_processes=hw.num_processes, process_id=hw.process_id
        )
    except Exception as ex:  # noqa: BLE001 - not on the machines it describes: one line
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise ConfigError(
            f"hardware={hw.name}: JAX's multi-host runtime did not start ({first}); run on the {hw.platform} "
            "slice it describes, choose the hardware this machine has (hardware=cpu), or task=plan to compile for it"
        ) from None


@hydra.main(version_base="1.3", config_path=_CONFIG_PATH, config_name="config")
def _hydra_entry(cfg: DictConfig) -> float | None:
    """One job; returns the task's objective (xgen/objective.py), which a sweeper optimizes."""
    run_dir = None
    try:
        _cpu_only_backend(cfg)
        hw = cfg.hardware
        quiet_cpu_compiler(str(hw.get("platform")), bool(hw.get("distributed") or hw.get("coordinator_address")))
        _set_host_devices(cfg)
        typed = to_object(cfg)
        validate(typed)
        _start_distributed(typed)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        owner = owns_run_dir(typed.task.name)
        # Held for the job (a sweep runs many in one process), before anything is written
        # there: a second process on this directory is refused here, and the first run's
        # records stay its own (xgen/run_lock.py).
        with run_lock.held(run_dir) if owner else contextlib.nullcontext():
            if owner:
                _save_run_config(cfg, run_dir)
            # Here, after XLA_FLAGS and the multi-host start: recording the devices starts JAX
            # (only for tasks that run on them: task=diff or task=carbon never start it).
            provenance.write(run_dir, uses_devices=typed.task.name not in LOCAL_TASKS, task=typed.task.name)
            result = run_task(typed, run_dir)
    except Exception as ex:  # noqa: BLE001 - only config errors are shortened; the rest re-raise
        # Exiting here, not in main(): Hydra would log a second line for a failed job.
        _exit_on_config_error(ex)
        _exit_on_unwritable(ex, run_dir)
        ex.xgen_judged = True  # a task's own error: main() must not take it for Hydra's set-up
        raise
    # A task's verdict as the exit code: task=diff's result has exit_code 1 when the configs differ (CI).
    if getattr(result, "exit_code", 0):
        sys.exit(result.exit_code)
    return objective(typed.task.name, result)


def main() -> None:
    """Console entry point: config mistakes end in one line on stderr and exit code 2."""
    sys.unraisablehook = unraisable_to_run_log
    # Let composition errors reach us instead of Hydra's multi-line report.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if not sys.stderr.isatty():  # Optuna's colorlog handler colours even a log file or a pipe
        os.environ.setdefault("NO_COLOR", "1")
    try:
        _hydra_entry()
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which checkpoints on it instead)
        print("xgen: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except Exception as ex:  # noqa: BLE001 - only config errors are shortened; the rest re-raise
        if not getattr(ex, "xgen_judged", False):
            _exit_on_config_error(ex)
            _exit_on_unwritable(ex)
        raise


def _exit_on_unwritable(ex: BaseException, run_dir: Path | None = None) -> None:
    """One line and exit 2 for files that cannot be written: a run directory Hydra could not
    create or log into (read-only, `/proc/...`; before xgen's own checks), or a disk that
    filled up under the metrics files (a write names no file: the run directory is named)."""
    import errno

    seen: BaseException | None = ex
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    full = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
    unwritable = full | {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}
    # Inside a task (run_dir known) only a full or read-only disk: a task reports a missing
    # or unreadable input itself, and "cannot write" would misname it.
    if _USER_WANTS_TRACES or seen is None or seen.errno not in (full if run_dir else unwritable):
        return
    if not seen.filename and run_dir is None:
        return
    print(f"xgen: storage error: cannot write {seen.filename or f'the run files in {run_dir}'}: {seen.strerror}", file=sys.stderr)
    exit_now(2)


if __name__ == "__main__":
    main()
