"""task=carbon: a run's energy and emissions, as the report's Section 6 computes them.

    energy (MWh)   = chip-hours x chip power (W) x PUE / 10^6
    emissions (t)  = energy x grid intensity (tCO2eq per MWh)

    python -m xgen.run task=carbon hardware=tpu_v4_512 carbon.chip_hours=270336   # the report: 57 MWh, 4.5 t
    python -m xgen.run task=carbon run_dir=outputs/pretrain_all/<time>            # measured: wall time x chips
    python -m xgen.run task=carbon run_dir=outputs/plan/<time>                    # planned: plan.json's tokens/s

Writes carbon.json (with `mwh` and `tco2eq`) in the run directory and prints a table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xgen.config import ConfigError, XGenConfig
from xgen.config.saved import read_saved_config

log = logging.getLogger(__name__)


def footprint(chip_hours: float, chip_power_w: float, pue: float, tco2_per_mwh: float) -> dict[str, float]:
    mwh = chip_hours * chip_power_w * pue / 1e6
    return {"mwh": mwh, "tco2eq": mwh * tco2_per_mwh}


def _run_chips(run_dir: Path, default: int) -> int:
    """Chips of the run that wrote `run_dir` (its saved Hydra config), else `default`. The
    run may be someone else's: its config is read as untrusted input (`read_saved_config`)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        return default
    hardware = read_saved_config(saved).get("hardware")
    chips = hardware.get("num_devices") if isinstance(hardware, dict) else None
    if isinstance(chips, bool) or not isinstance(chips, int) or chips < 1:
        raise ConfigError(f"{saved}: hardware.num_devices is {chips!r}, not a number of chips")
    return chips


def chip_hours_of(cfg: XGenConfig) -> tuple[float, str]:
    """(chip-hours, how they were obtained)."""
    if cfg.carbon.chip_hours is not None:
        return cfg.carbon.chip_hours, "given (carbon.chip_hours)"
    if cfg.run_dir is None:
        raise ConfigError("task=carbon needs carbon.chip_hours=<N> or run_dir=<a training or plan run directory>")
    run_dir = Path(cfg.run_dir)
    summaries = [run_dir / "summary.json"] if (run_dir / "summary.json").exists() else sorted(run_dir.glob("*/summary.json"))
    if summaries:
        hours = 0.0
        for path in summaries:
            chips = _run_chips(path.parent, cfg.hardware.num_devices)
            hours += json.loads(path.read_text())["wall_s"] * chips / 3600
        return hours, f"measured: wall time x chips of {len(summaries)} run(s) in {run_dir}"
    if (run_dir / "plan.json").exists():
        plan = json.loads((run_dir / "plan.json").read_text())
        if not plan.get("tokens_per_s"):
            raise ConfigError(f"run_dir={run_dir}: plan.json has no tokens_per_s (its hardware names no peak FLOP/s)")
        tokens = cfg.carbon.tokens or cfg.stage.token_budget
        hours = tokens / plan["tokens_per_s"] * plan["chips"] / 3600
        return hours, f"planned: {tokens:,} tokens at plan.json's {plan['tokens_per_s']:,.0f} tokens/s on {plan['chips']} chips"
    raise ConfigError(f"run_dir={run_dir}: neither summary.json (a training run) nor plan.json (task=plan) there")


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    hours, source = chip_hours_of(cfg)
    power = cfg.carbon.chip_power_w or cfg.hardware.chip_power_w
    pue = cfg.carbon.pue or cfg.hardware.pue
    if not power:
        raise ConfigError(f"hardware={cfg.hardware.name} has no chip_power_w: set carbon.chip_power_w=<watts>")
    result = {
        "chip_hours": hours,
        "chip_hours_source": source,
        "chip_power_w": power,
        "pue": pue,
        "tco2_per_mwh": cfg.carbon.tco2_per_mwh,
        **footprint(hours, power, pue, cfg.carbon.tco2_per_mwh),
    }
    (run_dir / "carbon.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [
        ("chip-hours", f"{hours:,.3f} ({source})"),
        ("chip power", f"{power:g} W x PUE {pue:g}"),
        ("energy", f"{result['mwh']:.3f} MWh"),
        ("emissions", f"{result['tco2eq']:.3f} tCO2eq at {cfg.carbon.tco2_per_mwh:g} t/MWh"),
    ]
    print("\n".join(f"{k:<11} {v}" for k, v in rows))
    log.info("carbon footprint written to %s", run_dir / "carbon.json")
    return result
