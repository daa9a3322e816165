"""What task=plan advises when the train step does not fit: a shipped execution preset that
does, measured by compiling the step with it, and the report's run (an `experiment/` file)
for the same model, stage and hardware.

Advice is measured, never guessed: "try execution.remat=full" reads as a fix but may not be
one, while a preset that was compiled for the slice and fits is. The presets are compiled in
the order of `plan.presets` (most memory saved first), only those before the command's own,
and only when its step does not fit; the first that fits ends the search. The advice is
overrides to paste: this command's own, less its `execution=` choice, plus the preset.
"""

from __future__ import annotations

import dataclasses
import shlex

from xgen.config import ConfigError, XGenConfig
from xgen.config.store import compose as compose_configs
from xgen.config.store import shipped


def check_presets(cfg: XGenConfig) -> None:
    """Refuse, before minutes of compiling, a `plan.presets` entry that names no preset."""
    known = shipped("execution")
    for name in cfg.plan.presets:
        if name not in known:
            raise ConfigError(f"plan.presets: no execution preset {name!r} (available: {', '.join(known)})")


def presets_to_try(cfg: XGenConfig) -> list[str]:
    """`plan.presets` is ordered by memory saved, most first: a preset after the command's own
    saves less, so only those before it are tried (all, if its own is not listed)."""
    order = list(cfg.plan.presets)
    own = cfg.execution.name
    return order[: order.index(own)] if own in order else order


def command_overrides() -> list[str]:
    """This command's overrides; none outside `python -m xgen.run` (a test calling the task)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def compose(overrides: list[str]) -> XGenConfig:
    return compose_configs([overrides])[0]


def with_preset(cfg: XGenConfig, preset: str, overrides: list[str]) -> XGenConfig:
    """This command's config with `execution=<preset>` added: the execution group as the
    pasted command composes it (the preset, with the command's own `execution.*` keys, and an
    experiment's, on top). Nothing else in the config reads the execution group, so the rest
    is the command's as it is."""
    kept = [o for o in overrides if _key(o) != "execution" and not _key(o).startswith("hydra.")]
    return dataclasses.replace(cfg, execution=compose([*kept, f"execution={preset}"]).execution)


def matching_experiment(cfg: XGenConfig) -> dict | None:
    """The `experiment/` file for this model, stage and hardware (by name), and the
    execution preset it sets; None if there is none, or if it runs this very execution."""
    for name in shipped("experiment"):
        exp = compose([f"experiment={name}"])
        if (exp.model.name, exp.stage.name, exp.hardware.name) == (cfg.model.name, cfg.stage.name, cfg.hardware.name):
            return None if exp.execution == cfg.execution else {"name": name, "execution": exp.execution.name}
    return None


def pasteable(overrides: list[str], extra: str) -> str:
    """The command to run instead: its overrides less `execution=` (which would win over
    the preset or the experiment's), plus `extra`; quoted for a POSIX shell."""
    kept = [o for o in overrides if _key(o) != "execution" and not _key(o).startswith("hydra.")]
    return "python -m xgen.run " + " ".join(shlex.quote(o) for o in [*kept, extra])


def setting_tips(cfg: XGenConfig) -> list[str]:
    """Single keys that lower the step's memory, for when no preset fits (not measured)."""
    tips = []
    if cfg.execution.remat == "none":
        tips.append("execution.remat=full")
    if cfg.hardware.platform == "tpu" and cfg.execution.attention != "splash":
        tips.append("execution.attention=splash")
    elif cfg.execution.attention in ("dense", "xla"):
        tips.append("execution.attention=block_causal")
    if cfg.trainer.grad_accum_steps == 1:
        tips.append("trainer.grad_accum_steps=4")
    if cfg.optimizer.mu_dtype == "float32":
        tips.append("optimizer.mu_dtype=bfloat16")
    return tips


def advise(cfg: XGenConfig, fits: bool, tried: list[dict], overrides: list[str]) -> dict:
    """The verdict line and, when the step does not fit, what to run instead: the first
    preset in `tried` that fits (with its measured memory) as overrides to paste, and the
    matching experiment; failing a preset, single settings to try (not measured)."""
    if fits:
        return {"verdict": "fits", "overrides": [], "command": None, "experiment": None}
    fitting = next((t for t in tried if t["fits"]), None)
    experiment = matching_experiment(cfg) if cfg.hardware.tpu_topology else None
    report_run = f"experiment={experiment['name']} (the report's run of this model, stage and hardware)" if experiment else ""
    parts = []
    if fitting is not None:
        add = f"add execution={fitting['execution']} ({fitting['hbm_per_chip_bytes'] / 2**30:.2f} GiB per chip, compiled)"
        if experiment and experiment["execution"] == fitting["execution"]:
            add += f", as {report_run} does"
            experiment_said = True
        else:
            experiment_said = False
        parts.append(add)
    else:
        experiment_said = False
        # Single settings, not measured: on top of the preset that came closest, if any.
        least = min((t for t in tried if t["hbm_per_chip_bytes"]), key=lambda t: t["hbm_per_chip_bytes"], default=None)
        base = with_preset(cfg, least["execution"], overrides) if least else cfg
        if tried:
            parts.append("no preset fits (" + ", ".join(f"execution={t['execution']}: {_shown(t)}" for t in tried) + ")")
        tips = [*setting_tips(base), "more chips (hardware=...)", "a smaller stage.batch_tokens"]
        on = f"with execution={least['execution']}, " if least else ""
        parts.append(f"{on}try {', '.join(tips[:-1])} or {tips[-1]}")
    if experiment and not experiment_said:
        parts.append(f"{report_run} sets execution={experiment['execution']}")
    extra = f"execution={fitting['execution']}" if fitting else None
    return {
        "verdict": "does not fit: " + "; ".join(parts),
        "overrides": [extra] if extra else [],
        "command": pasteable(overrides, extra) if extra and overrides else None,
        "experiment": experiment["name"] if experiment else None,
    }


def _shown(tried: dict) -> str:
    if tried.get("error"):
        return "did not compile"
    return f"{tried['hbm_per_chip_bytes'] / 2**30:.2f} GiB"


def tried_row(tried: dict, capacity: int | None) -> str:
    """One preset's line in the plan's table."""
    if tried.get("error"):
        return f"did not compile: {tried['error']} (run.log)"
    verdict = "fits" if tried["fits"] else "does not fit"
    of = f" of {capacity / 2**30:.2f} GiB" if capacity else ""
    how = f"compiled in {tried['compile_s']:.1f} s" if tried["compile_s"] is not None else "refused by XLA: its temporaries alone"
    return f"{tried['hbm_per_chip_bytes'] / 2**30:.2f} GiB per chip{of}: {verdict} ({how})"
