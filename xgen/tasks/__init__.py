"""One module per task; `xgen.run` only dispatches here, importing the task lazily."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any

from xgen import run_lock
from xgen.config import ConfigError, XGenConfig

# task.name -> module with `run(cfg: XGenConfig, run_dir: Path)`.
TASKS = {
    "pretrain": "xgen.tasks.pretrain",
    "prepare": "xgen.tasks.prepare",
    "pretrain_all": "xgen.tasks.pretrain_all",
    "plan": "xgen.tasks.plan",
    "plot": "xgen.tasks.plot",
    "export_hf": "xgen.tasks.export_hf",
    "import_hf": "xgen.tasks.import_hf",
    "generate": "xgen.tasks.generate",
    "chat": "xgen.tasks.chat",
    "sft": "xgen.tasks.sft",
    "serve": "xgen.tasks.serve",
    "carbon": "xgen.tasks.carbon",
    "eval": "xgen.tasks.eval",
    "report": "xgen.tasks.report",
    "diff": "xgen.tasks.diff",
}


# Tasks that never run on the hardware's devices, so they start no multi-host runtime
# (task=plan compiles for a TPU pod from one machine).
LOCAL_TASKS = frozenset({"prepare", "plan", "plot", "export_hf", "import_hf", "carbon", "report", "diff"})


def owns_run_dir(task_name: str) -> bool:
    """Whether this process writes the run's records: process 0 of a multi-host job (a local
    task never starts JAX's multi-host runtime, so it is always its own owner)."""
    if task_name in LOCAL_TASKS or "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


def run_task(cfg: XGenConfig, run_dir: Path) -> Any:
    """Import and run the task that `cfg.task.name` names, holding the run directory's lock
    (xgen.run_lock) unless this process already does; returns the task's result."""
    module = TASKS.get(cfg.task.name)
    if module is None:
        raise ConfigError(f"task.name={cfg.task.name!r} is not one of {sorted(TASKS)}")
    with run_lock.held(run_dir) if owns_run_dir(cfg.task.name) else contextlib.nullcontext():
        return importlib.import_module(module).run(cfg, run_dir)
