"""One module per task; `xgen.run` only dispatches here, importing the task lazily."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

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


def run_task(cfg: XGenConfig, run_dir: Path) -> Any:
    """Import and run the task that `cfg.task.name` names; returns the task's result."""
    module = TASKS.get(cfg.task.name)
    if module is None:
        raise ConfigError(f"task.name={cfg.task.name!r} is not one of {sorted(TASKS)}")
    return importlib.import_module(module).run(cfg, run_dir)
