"""One module per task; `xgen.run` only dispatches here, importing the task lazily."""

from __future__ import annotations

import importlib
from pathlib import Path

from xgen.config import ConfigError, XGenConfig

# task.name -> module with `run(cfg: XGenConfig, run_dir: Path) -> None`.
TASKS = {
    "pretrain": "xgen.tasks.pretrain",
}


def run_task(cfg: XGenConfig, run_dir: Path) -> None:
    """Import and run the task that `cfg.task.name` names."""
    module = TASKS.get(cfg.task.name)
    if module is None:
        raise ConfigError(f"task.name={cfg.task.name!r} is not one of {sorted(TASKS)}")
    importlib.import_module(module).run(cfg, run_dir)
