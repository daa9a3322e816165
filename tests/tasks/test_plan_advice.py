"""task=plan's advice when the train step does not fit: an execution preset compiled for the
slice and found to fit, as overrides to paste, and the report's run of the same model, stage
and hardware (xgen/tasks/plan_advice.py)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import CONF_DIR, compose_config
from tests.tasks.test_plan import REPO, needs_libtpu
from xgen.config import ConfigError
from xgen.config.schema import PlanConfig
from xgen.tasks import run_task
from xgen.tasks.plan_advice import advise, matching_experiment, presets_to_try, with_preset

SEVEN_B_8K = ("model=xgen_7b", "stage=s3_8k", "hardware=tpu_v4_512")
COMMAND = ["task=plan", *SEVEN_B_8K]
LIBTPU_LINES = ("unexpected worker hostname", "TPU_WORKER_HOSTNAMES", "jellyfish", "E0000", "InitGoogle")


def tried(name: str, gib: float | None, fits: bool, error: str | None = None) -> dict:
    hbm = None if gib is None else int(gib * 2**30)
    return {"execution": name, "hbm_per_chip_bytes": hbm, "compile_s": 1.0, "fits": fits, "error": error}


def test_the_presets_tried_by_default_are_every_shipped_execution_preset():
    """A preset added to conf/execution/ without a place in plan.presets would never be tried."""
    shipped = sorted(p.stem for p in (CONF_DIR / "execution").glob("*.yaml"))
    assert sorted(PlanConfig().presets) == shipped


def test_only_presets_that_save_more_memory_than_the_commands_own_are_tried():
    assert presets_to_try(compose_config(*SEVEN_B_8K)) == ["tpu_splash", "memory_saving"]
    assert presets_to_try(compose_config(*SEVEN_B_8K, "execution=memory_saving")) == ["tpu_splash"]
    assert presets_to_try(compose_config(*SEVEN_B_8K, "execution=tpu_splash")) == []
    assert presets_to_try(compose_config(*SEVEN_B_8K, "plan.presets=[]")) == []


def test_a_preset_is_measured_with_the_commands_own_execution_keys_on_top():
    """`execution=tpu_splash` pasted into a command that sets execution.attention_chunk keeps
    that key: the config measured is the one the pasted command composes."""
    cfg = compose_config(*SEVEN_B_8K, "execution.attention_chunk=256")
    tried_cfg = with_preset(cfg, "tpu_splash", ["execution.attention_chunk=256", "model=xgen_7b"])
    assert tried_cfg.execution.name == "tpu_splash" and tried_cfg.execution.attention == "splash"
    assert tried_cfg.execution.attention_chunk == 256 and tried_cfg.execution.loss_chunk == 1024
    assert tried_cfg.model == cfg.model and tried_cfg.stage == cfg.stage and tried_cfg.hardware == cfg.hardware


def test_the_report_run_of_a_model_stage_and_hardware_is_found_by_name():
    assert matching_experiment(compose_config(*SEVEN_B_8K)) == {"name": "xgen_7b_s3_8k", "execution": "tpu_splash"}
    assert matching_experiment(compose_config("model=xgen_7b", "stage=s1_2k", "hardware=tpu_v4_512"))["name"] == "xgen_7b_s1_2k"
    # Running its execution already: the experiment has nothing to add.
    assert matching_experiment(compose_config(*SEVEN_B_8K, "execution=tpu_splash")) is None
    assert matching_experiment(compose_config("model=small", "stage=s3_8k", "hardware=tpu_v4_512")) is None
    assert matching_experiment(compose_config("model=xgen_7b", "stage=s3_8k", "hardware=tpu_v4_256")) is None


def test_the_advice_names_the_first_preset_that_fits_and_the_command_to_paste():
    cfg = compose_config(*SEVEN_B_8K)
    advice = advise(cfg, False, [tried("tpu_splash", 9.33, True)], [*COMMAND, "execution=default", "plan.presets=[tpu_splash]"])
    assert advice["verdict"] == (
        "does not fit: add execution=tpu_splash (9.33 GiB per chip, compiled), as experiment=xgen_7b_s3_8k "
        "(the report's run of this model, stage and hardware) does"
    )
    assert advice["overrides"] == ["execution=tpu_splash"] and advice["experiment"] == "xgen_7b_s3_8k"
    # The command's own execution= choice would win over the preset: it is left out.
    assert advice["command"] == (
        "python -m xgen.run task=plan model=xgen_7b stage=s3_8k hardware=tpu_v4_512 'plan.presets=[tpu_splash]' execution=tpu_splash"
    )
    assert advise(cfg, True, [], COMMAND) == {"verdict": "fits", "overrides": [], "command": None, "experiment": None}


def test_a_fitting_preset_other_than_the_experiments_is_named_with_the_experiment_beside_it():
    advice = advise(compose_config(*SEVEN_B_8K), False, [tried("tpu_splash", 40, False), tried("memory_saving", 10.65, True)], COMMAND)
    assert advice["verdict"].startswith("does not fit: add execution=memory_saving (10.65 GiB per chip, compiled); ")
    assert advice["verdict"].endswith("experiment=xgen_7b_s3_8k (the report's run of this model, stage and hardware) sets execution=tpu_splash")
    assert advice["overrides"] == ["execution=memory_saving"] and advice["command"].endswith(" execution=memory_saving")


def test_with_no_preset_fitting_the_advice_builds_on_the_one_that_came_closest():
    cfg = compose_config("model=small", "stage=s1_2k", "hardware=tpu_v4_8")
    advice = advise(cfg, False, [tried("tpu_splash", 100.11, False), tried("memory_saving", None, False, "boom")], COMMAND)
    assert advice["verdict"] == (
        "does not fit: no preset fits (execution=tpu_splash: 100.11 GiB, execution=memory_saving: did not compile); "
        "with execution=tpu_splash, try trainer.grad_accum_steps=4, optimizer.mu_dtype=bfloat16, more chips (hardware=...) "
        "or a smaller stage.batch_tokens"
    )
    assert advice["overrides"] == [] and advice["command"] is None
    # Nothing tried (plan.presets=[]): the single settings against the command's own execution.
    assert "try execution.remat=full, execution.attention=splash, " in advise(cfg, False, [], COMMAND)["verdict"]


def test_a_preset_that_is_not_shipped_is_refused_before_anything_compiles(tmp_path):
    with pytest.raises(ConfigError, match=r"plan.presets: no execution preset 'tpu_flash' \(available: default, memory_saving, tpu_splash\)"):
        run_task(compose_config("task=plan", "model=tiny", "hardware=tpu_v4_8", "plan.presets=[tpu_flash]"), tmp_path)
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.slow
@needs_libtpu
def test_a_plan_that_does_not_fit_names_the_preset_that_does(tmp_path):
    """The tiny model's 8 x 512-token step on a v4-8 whose chips are said to hold 16 MiB:
    without remat (execution=default, 27 MiB per chip) it does not fit; with
    execution=memory_saving (9.6 MiB, 2026-12-08) it does. The plan compiles both and says
    so, as an override and as the command to paste; libtpu's start-up complaints (off a TPU
    VM) are in run.log, not on the console."""
    overrides = [
        "task=plan", "model=tiny", "stage=s1_2k", "stage.seq_len=512", "stage.batch_tokens=4096", "hardware=tpu_v4_8",
        "hardware.memory_per_chip_bytes=16777216", "plan.generate=false", "plan.presets=[memory_saving]",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert not plan["fits"] and plan["hbm_per_chip_bytes"] > 16 * 2**20
    [memory_saving] = plan["presets_tried"]
    assert memory_saving["execution"] == "memory_saving" and memory_saving["fits"] and memory_saving["compile_s"] > 0
    assert 0 < memory_saving["hbm_per_chip_bytes"] <= 16 * 2**20
    assert plan["verdict"] == f"does not fit: add execution=memory_saving ({memory_saving['hbm_per_chip_bytes'] / 2**30:.2f} GiB per chip, compiled)"
    command = "python -m xgen.run " + " ".join(overrides[:-1]) + " 'plan.presets=[memory_saving]' execution=memory_saving"
    assert plan["advice"] == {"overrides": ["execution=memory_saving"], "command": command, "experiment": None}
    rows = {line[:16].strip(): line[16:].strip() for line in proc.stdout.splitlines() if not line.startswith("[")}
    assert rows["HBM per chip"].endswith(": does not fit")
    assert rows["preset tried"].startswith("execution=memory_saving: ") and ": fits (compiled in" in rows["preset tried"]
    assert rows["advice"] == plan["verdict"].removeprefix("does not fit: ") and rows["command"] == command
    console = proc.stdout + proc.stderr
    assert not [line for line in LIBTPU_LINES if line in console], console[-3000:]
    assert "starts from stage" not in console
    # Off a TPU VM libtpu complains as it loads: into run.log, and its capture file is gone.
    log = (tmp_path / "run.log").read_text()
    assert "libtpu wrote to stderr:" in log and "unexpected worker hostname" in log
    assert not (tmp_path / "libtpu.stderr").exists()
