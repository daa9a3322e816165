"""What a resume checks: the command still describes the run that wrote the checkpoint.

A rerun in the same run directory continues from its newest checkpoint. If the resolved
config differs from the checkpoint's in a key that changes the numbers (the model, the
data, the schedule, the seed...), continuing would silently produce a different run than
either command asked for, so it is refused, listing each key as `old -> new`. A deliberate
change is allowed by naming its keys (or a prefix) in `trainer.allow_changes`, and is then
recorded in events.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from xgen.config import ConfigError, XGenConfig
from xgen.config.changes import ABSENT, flatten, key_changes

# Keys (prefixes) whose change changes what the run computes. Not here: cadence (log and
# checkpoint intervals), the mesh and hardware (checkpoints restore onto any mesh), and
# where files are read from or written to.
RUN_DEFINING = (
    "model.", "tokenizer.", "data_mix.", "stage.", "optimizer.", "seed",
    "trainer.steps", "trainer.grad_accum_steps", "trainer.spike.", "trainer.rewarm_steps",
    "trainer.reset_optimizer", "trainer.init_params_only", "execution.compute_dtype", "hardware.compute_dtype",
)  # fmt: skip


# Inside those, keys that change no number: when a run stops, not what it computes (a
# checkpoint from before such a key existed resumes under its default).
NOT_DEFINING = ("trainer.spike.max_rollbacks", "data_mix.prepare_on_use")


def _defining(key: str) -> bool:
    """A prefix ending in "." covers a section; any other entry is one exact key."""
    return key not in NOT_DEFINING and any(key.startswith(p) if p.endswith(".") else key == p for p in RUN_DEFINING)


def run_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Run-defining keys whose values differ: key -> (checkpoint's, command's)."""
    old = flatten(saved)
    every = key_changes(saved, json.loads(json.dumps(current)))
    changes = {
        key: (None if a is ABSENT else a, None if b is ABSENT else b) for key, (a, b) in sorted(every.items()) if _defining(key)
    }
    # More steps under a fixed decay length continue the same schedule: the run so far is the same.
    decay = "optimizer.decay_steps"
    if "trainer.steps" in changes and decay not in changes and old.get(decay) is not None:
        del changes["trainer.steps"]
    return changes


def check_resume(saved_config: dict, cfg: XGenConfig, where: str) -> dict[str, tuple[Any, Any]]:
    """The allowed changes (for the events log); raises ConfigError for any other."""
    changes = run_changes(saved_config, dataclasses.asdict(cfg))
    allowed = [a.rstrip(".") for a in cfg.trainer.allow_changes]
    permitted = lambda key: any(key == a or key.startswith(a + ".") for a in allowed)  # noqa: E731
    refused = {k: v for k, v in changes.items() if not permitted(k)}
    if refused:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"resuming {where}: the command changes the run ({listed}); rerun with the checkpoint's values, "
            f"use a new run directory, or allow it with trainer.allow_changes=[{','.join(refused)}]"
        )
    return changes


def check_data(saved: dict | None, current: dict | None, allow: list[str], where: str) -> None:
    """The same config can name other documents: files changed under `data_mix.paths` and
    prepared again, a source re-prepared, another Python's standard library. Each source's
    identity (its index's digest, or its documents' lengths and content keys) is stored in
    every checkpoint; a resume onto other documents would continue the run on another data
    order, so it is refused unless `trainer.allow_changes` names `data`."""
    if not saved or not current or "data" in allow:
        return
    changed = sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))
    if changed:
        raise ConfigError(
            f"{where}: the documents of data_mix source(s) {', '.join(changed)} are not those the checkpoint was trained on "
            "(their files changed and were prepared again, or another corpus answers to the name): use a new run "
            "directory, or allow it with trainer.allow_changes=[data]"
        )
