import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONF_DIR, compose_config
from xgen.config import ConfigError
from xgen.config.validate import mesh_shape, validate

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_the_groups_of_the_design_are_there():
    assert {"task", "model", "tokenizer", "data_mix", "stage", "optimizer", "hardware", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_file_composes_into_the_typed_config(group, option):
    # Checked as a command that neither trains nor reads the data (a group file alone is
    # not a runnable training job: a TPU slice needs its stage's batch, a mix its data).
    cfg = compose_config(f"{group}={option}", *(() if group == "task" else ("task=generate",)))
    if group == "experiment" and option.startswith("xgen_7b"):  # the report's runs
        assert cfg.model.name == "xgen_7b" and cfg.hardware.name == "tpu_v4_512"
    elif group == "experiment":  # python_demo: a CPU run that visibly learns
        assert cfg.hardware.name == "cpu" and cfg.prompt is not None and cfg.data_mix.name == "python_code"
    elif group == "debug":  # global too: it cuts the run down rather than naming a node
        assert cfg.model.name == "tiny" and cfg.trainer.steps is not None
    elif group == "tracker":  # several may be chosen at once, so a tracker is a node of its own, not a name
        chosen = [name for name in ("tensorboard", "wandb") if getattr(cfg.tracker, name) is not None]
        assert chosen == ([] if option == "none" else [option])
    else:
        assert getattr(cfg, group).name == option
    if cfg.model.name == "llama_7b":
        with pytest.raises(ConfigError, match="vocab_size=32000"):
            validate(cfg)
    else:
        validate(cfg)


def test_report_final_stage_on_a_512_chip_pod():
    cfg = compose_config("stage=s3_8k", "hardware=tpu_v4_512")
    assert cfg.stage.seq_len == 8192 and cfg.stage.init_from_stage == "s2_4k"
    assert cfg.hardware.num_devices == 512 and mesh_shape(cfg.hardware) == {"data": 1, "fsdp": 512, "context": 1, "tensor": 1}
    assert cfg.hardware.compute_dtype == "bfloat16" and cfg.optimizer.name == "adamw"


def test_stage_schedule_keeps_tokens_per_batch_and_chains_checkpoints():
    stages = {name: compose_config(f"stage={name}").stage for name in ("s1_2k", "s2_4k", "s3_8k", "s4_code_8k")}
    assert [s.seq_len for s in stages.values()] == [2048, 4096, 8192, 8192]
    assert {s.batch_tokens for s in stages.values()} == {4 * 1024 * 1024}
    assert [s.token_budget for s in stages.values()] == [800e9, 400e9, 300e9, 110e9]
    assert [s.init_from_stage for s in stages.values()] == [None, "s1_2k", "s2_4k", "s3_8k"]


def test_code_stage_switches_to_the_starcoder_mixture():
    mix = compose_config("stage=s4_code_8k").data_mix
    assert mix.name == "stage2_starcoder"
    assert mix.sources["starcoder"].weight == pytest.approx(0.5)
    assert sum(s.weight for s in mix.sources.values()) == pytest.approx(1.0)


def test_default_run_is_the_tiny_demo_on_cpu():
    cfg = compose_config()
    assert (cfg.model.name, cfg.data_mix.name, cfg.stage.name, cfg.hardware.name) == ("tiny", "demo", "demo", "cpu")
    assert cfg.optimizer.name == "demo"
    weights = {k: s.weight for k, s in cfg.data_mix.sources.items()}
    assert weights == {"python_docs": pytest.approx(0.9531), "python_stdlib": pytest.approx(0.0469)}


def test_command_line_override_beats_a_stage_default():
    assert compose_config("optimizer=adamw").optimizer.name == "adamw"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model=no_such_model", "model/no_such_model"),
        ("optimizer.lr=abc", "optimizer.lr"),
        ("model.d_modle=5", "d_modle"),
        ("model.n_heads=5", "model.n_heads=5"),
        ("hardware.mesh.tensor=3", "hardware.mesh"),
        ("prompt=def main():", "'prompt=def main():'"),
        # Choice fields are enums: refused at composition, with the choices.
        ("execution.remat=everything", "expected one of [none, full, save_dots]"),
        ("execution.attention=flash", "expected one of [dense, xla, chunked, block_causal, splash, cudnn]"),
        ("trainer.spike.policy=ignore", "expected one of [log, skip, rollback]"),
        ("execution.compute_dtype=int8", "expected one of [float32, bfloat16, float16]"),
        ("optimizer.mu_dtype=half", "expected one of [float32, bfloat16, float16]"),
        ("hardware.platform=npu", "expected one of [cpu, gpu, tpu]"),
    ],
)
def test_config_mistakes_fail_in_one_readable_line(override, needle, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", override, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("xgen: config error:") and needle in lines[0]
