"""Every config value is checked for its meaning before any work (issue 14): each mistake
below was once a traceback, an error only after building the data, or silently accepted.
Each is now refused by composition or `validate` (no data, no devices), naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.config.validate import validate

REPO = Path(__file__).resolve().parents[2]

# (overrides, what the one line must say)
BAD = [
    # once tracebacks
    (["model.n_heads=0"], "model.n_heads=0 must be a finite number > 0"),
    (["stage.seq_len=0"], "stage.seq_len=0 must be"),
    (["model.max_positions=0"], "model.max_positions=0 must be"),
    (["model.d_model=0"], "model.d_model=0 must be"),
    (["model.d_ff=0"], "model.d_ff=0 must be"),
    (["execution.attention_chunk=0"], "execution.attention_chunk=0 must be"),
    (["tokenizer.name=gpt2"], "tokenizer.name='gpt2': only 'xgen' is known"),
    (["data_mix.sources.python_docs.weight=inf"], "data_mix.sources.python_docs.weight=inf must be a finite number"),
    (["loader.prefetch_batches=-1"], "loader.prefetch_batches=-1 must be a finite number >= 0"),
    # once refused only after the data pipeline was built
    (["stage.seq_len=32", "stage.batch_tokens=96", "hardware=cpu_8"], "does not split over the mesh"),
    (["trainer.grad_accum_steps=3"], "trainer.grad_accum_steps=3 micro-batches does not split"),
    (["trainer.init_from=/nonexistent/run"], "trainer.init_from=/nonexistent/run: no such directory"),
    (["data_mix=stage1", "stage=s1_2k", "data_dir=/nonexistent"], "not prepared (no manifest.json); run task=prepare first"),
    # once accepted with exit 0
    (["optimizer.lr=inf"], "optimizer.lr=inf must be a finite number > 0"),
    (["optimizer.weight_decay=nan"], "optimizer.weight_decay=nan must be a finite number >= 0"),
    (["model.rope_theta=0"], "model.rope_theta=0.0 must be"),
    (["model.rope_scaling.factor=4"], "model.rope_scaling.factor=4.0 has no effect with type=default"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"],
     "model.rope_scaling.original_max_positions must be set (a number > 0): type=yarn needs the length"),
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor=0.5 must be >= 1"),
    (["model.rope_scaling.type=linear", "model.rope_scaling.beta_fast=8"], "model.rope_scaling.beta_fast=8.0 has no effect with type=linear"),
    (["optimizer.grad_clip=-1"], "optimizer.grad_clip=-1.0 must be a finite number > 0"),
    (["model.n_layers=0"], "model.n_layers=0 must be"),
    (["model.n_layers=-1"], "model.n_layers=-1 must be"),
    (["optimizer.beta1=2"], "optimizer.beta1=2.0 must be a finite number in [0, 1)"),
    (["optimizer.eps=-1"], "optimizer.eps=-1.0 must be"),
    (["optimizer.min_lr_ratio=2"], "optimizer.min_lr_ratio=2.0 must be a finite number in [0, 1]"),
    (["optimizer.warmup_steps=-10"], "optimizer.warmup_steps=-10 must be"),
    (["trainer.spike.threshold=nan"], "trainer.spike.threshold=nan must be"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1 must be"),
    (["trainer.checkpoints_to_keep=0"], "trainer.checkpoints_to_keep=0 must be"),
    (["+trainer.stepz=5"], "unknown config key trainer.stepz (did you mean trainer.steps?)"),
    (["+foo=bar"], "unknown config key foo"),
    # and their neighbours
    (["optimizer.beta2=1"], "optimizer.beta2=1.0 must be a finite number in [0, 1)"),
    (["optimizer.decay_steps=0"], "optimizer.decay_steps=0 must be a finite number > 0 (or null)"),
    (["trainer.log_every=0"], "trainer.log_every=0 must be"),
    (["trainer.spike.decay=1"], "trainer.spike.decay=1.0 must be a finite number in (0, 1)"),
    (["generate.top_p=0"], "generate.top_p=0.0 must be a finite number in (0, 1]"),
    (["generate.temperature=-1"], "generate.temperature=-1.0 must be"),
    (["model.n_kv_heads=0"], "model.n_kv_heads=0 must be a finite number > 0 (or null)"),
    (["model.init_std=nan"], "model.init_std=nan must be"),
    (["stage.token_budget=-1"], "stage.token_budget=-1 must be a finite number >= 0"),
    (["plan.mfu=1.5"], "plan.mfu=1.5 must be a finite number in (0, 1]"),
    (["trainer.checkpoint_minutes=-5"], "trainer.checkpoint_minutes=-5.0 must be a finite number >= 0"),
    (["trainer.step_timeout_minutes=inf"], "trainer.step_timeout_minutes=inf must be a finite number >= 0"),
    (["plan.storage_bytes_per_s=0"], "plan.storage_bytes_per_s=0.0 must be a finite number > 0"),
    (["hardware.num_devices=0"], "hardware.num_devices=0 must be"),
    (["seed=1180591620717411303424"], "seed=1180591620717411303424 must be a finite number in [0, 2**63)"),  # 2**70: once an OverflowError
    (["trainer.spike.max_rollbacks=0"], "trainer.spike.max_rollbacks=0 must be a finite number > 0"),
    (["serve.max_request_share=0"], "serve.max_request_share=0.0 must be a finite number in (0, 1]"),
    (["serve.idle_timeout_s=0"], "serve.idle_timeout_s=0.0 must be a finite number > 0"),
    # context parallelism: lengths that do not split into 2 x context chunks, kernels that cannot gather
    (["hardware=cpu_8", "hardware.mesh.fsdp=2", "hardware.mesh.context=4", "hardware.mesh.data=1", "hardware.mesh.tensor=1",
      "stage.seq_len=36", "stage.batch_tokens=288"], "stage.seq_len=36 does not split into 2 x hardware.mesh.context=4"),
    (["hardware=cpu_8", "hardware.mesh.fsdp=2", "hardware.mesh.context=4", "hardware.mesh.data=1", "hardware.mesh.tensor=1",
      "execution.attention=splash", "stage.seq_len=1152", "stage.batch_tokens=2304"],
     "stage.seq_len=1152 gives 288 queries per device over hardware.mesh.context=4, not a multiple of splash's 384-token"),
    (["hardware.mesh.context=0"], "hardware.mesh: sizes must be positive or -1"),
    (["hardware=cpu_8", "hardware.mesh.fsdp=2", "hardware.mesh.context=4", "hardware.mesh.data=1", "hardware.mesh.tensor=1",
      "execution.attention=splash", "execution.context_strategy=ring"], "execution.context_strategy=ring runs the tiled kernel"),
    (["hardware=cpu_8", "hardware.mesh.fsdp=2", "hardware.mesh.context=4", "hardware.mesh.data=1", "hardware.mesh.tensor=1",
      "hardware.logical_axis_rules=[[batch,[data,fsdp]],[embed,fsdp]]"],
     "hardware.mesh.context=4 but hardware.logical_axis_rules maps `length` to nothing"),
]


def refusal(overrides: list[str]) -> str:
    """The one line a config is refused with (composition or validation), or '' if accepted."""
    try:
        validate(compose_config(*overrides))
    except ConfigError as ex:
        return str(ex)
    return ""


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_each_bad_value_is_refused_naming_the_key_and_the_rule(overrides, needle):
    line = refusal(overrides)
    assert needle in line, line or "accepted"
    assert "\n" not in line


def test_the_shipped_configs_pass_the_same_checks():
    assert refusal([]) == ""
    assert refusal(["experiment=xgen_7b_s3_8k", "task=plan"]) == ""
    assert refusal(["task=eval", "eval=zeroshot"]) == ""


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.d_modle=5"], "did you mean model.d_model?"),
        (["hardware=gpu_1"], "hardware=gpu_1 is for gpu devices but JAX sees"),
        (["hardware=cpu_8", "hardware.num_devices=16", "hardware.mesh.fsdp=-1", "stage.batch_tokens=1024"], "hardware=cpu_8 wants 16 devices but JAX sees 8"),
        (["hardware=tpu_v4_512", "stage.batch_tokens=65536"], "hardware=tpu_v4_512 is for a multi-host tpu job"),
        # Needs the data (lengths only), so it comes after validation, still before the model.
        (["data_mix.min_doc_tokens=100000000"], "part python_docs has no documents (dropped: {'min_doc_tokens': "),
        (["task=eval", "eval=humaneval", "eval.sandbox.backend=docker"], "eval.sandbox.backend=docker"),
        (["tracker.wandb.project=p"], "tracker.wandb.project=p sets a key of the tracker.wandb config, which this command does not select: add tracker=wandb"),
        (["sft.epochs=2"], "sft.epochs=2 sets a key of the sft config, which this command does not select: add sft=<option>"),
    ],
)
def test_the_command_line_says_it_in_one_line_and_exits_2(overrides, needle, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", *overrides, "trainer.steps=1", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("xgen: config error:") and needle in lines[0]
    assert "parameters | mesh" not in proc.stdout  # refused before the model was built
