"""task=plan compiles the real step for a TPU topology with libtpu (the `tpu` extra)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra (libtpu)")


def plan_cli(tmp_path, *overrides) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=plan", *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HBM per chip" in proc.stdout and "FLOPs per step" in proc.stdout
    return json.loads((tmp_path / "plan.json").read_text())


@pytest.mark.slow
@needs_libtpu
def test_plan_compiles_for_a_tpu_v4_slice_and_reports_memory_and_flops(tmp_path):
    """Splash attention (Pallas, per device under shard_map) and scanned layers, compiled for
    a v4-8. The decoding step is planned by the 7B test below; here only the train step."""
    plan = plan_cli(
        tmp_path, "model=small", "stage=s1_2k", "stage.batch_tokens=16384", "hardware=tpu_v4_8", "plan.generate=false",
        "execution.attention=splash", "execution.attention_chunk=512", "execution.scan_layers=true",
    )  # fmt: skip
    assert plan["method"].startswith("compiled for v4:2x2x2") and "splash" in plan["method"]
    assert plan["fits"] and 0 < plan["hbm_per_chip_bytes"] < plan["hbm_capacity_bytes"] == 32 * 2**30
    # Counted in the step (the scan's body 8 times, splash's causal half analytically), the FLOPs
    # are what the MFU formula counts (6 x matmul parameters + causal attention) to a few percent;
    # 6N over all parameters also counts the input embedding's gather. XLA's cost analysis
    # counts the scanned body once.
    assert plan["flops_per_step"] / plan["flops_per_step_model"] == pytest.approx(1.0, abs=0.05)
    assert plan["flops_per_step_6n"] > plan["flops_per_step"] > 2 * plan["flops_per_step_xla"]
    assert plan["attention_flops_masked"] == pytest.approx(plan["attention_flops_square"] * 2047 / 4096)
    assert plan["tokens_per_s"] == pytest.approx(16384 / plan["step_time_s"])
    # The roofline: the compiled program's own FLOPs and bytes against v4's peak and HBM bandwidth.
    per_chip = plan["flops_per_step"] / plan["chips"]
    assert plan["roofline_bound"] in ("compute", "memory") and plan["bytes_accessed_per_chip"] > 0
    assert plan["roofline_step_time_s"] == pytest.approx(max(per_chip / 275e12, plan["bytes_accessed_per_chip"] / 1.2e12))
    assert plan["compile_s"] > 0
    # What a failure costs: the train state (float32 parameters and Adam's two moments) read
    # back by each of the slice's 2 hosts at the stated bandwidth, and half the default
    # 30-minute checkpoint interval of steps redone on average.
    r = plan["recovery"]
    assert r["checkpoint_bytes"] == pytest.approx(plan["params"] * 4 * 3, rel=1e-3) and r["hosts"] == 2
    assert r["restore_s"] == pytest.approx(r["checkpoint_bytes"] / 2 / 1e9) and r["lost_work_s_mean"] == 15 * 60


@needs_libtpu
def test_plan_says_which_setting_to_change_when_it_does_not_fit(tmp_path):
    """With no preset to try (plan.presets=[]; tests/tasks/test_plan_advice.py tries them)."""
    plan = plan_cli(
        tmp_path, "model=small", "stage=s1_2k", "hardware=tpu_v4_8", "plan.generate=false", "execution.scan_layers=true", "plan.presets=[]"
    )
    assert not plan["fits"] and "execution.remat=full" in plan["verdict"] and plan["presets_tried"] == []


def test_gpu_plan_is_the_analytic_estimate(tmp_path):
    plan = run_task(compose_config("task=plan", "model=xgen_7b", "stage=s3_8k", "hardware=gpu_1"), tmp_path)
    assert plan["method"].startswith("analytic")
    assert plan["params"] == 6_895_702_016 and plan["hbm_per_chip_bytes"] == 6_895_702_016 * 16
    assert not plan["fits"] and json.loads((tmp_path / "plan.json").read_text())["chips"] == 1


@pytest.mark.slow
@needs_libtpu
def test_the_7b_generate_step_compiles_for_a_tpu_v4_8_and_reports_its_per_chip_memory():
    """The Engine's decoding step, sharded by the runtime over a v4-8 (compiled in a child:
    libtpu is loaded once per process), holds 1/8 of the float32 parameters and of 8 rows'
    bf16 KV caches of 8,192 slots per chip."""
    script = (
        "import json, os\n"
        "os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] = '1'\n"
        "from tests.conftest import compose_config\n"
        "from xgen.parallel import topology_devices\n"
        "from xgen.runtime import Runtime\n"
        "from xgen.tasks.plan import _generate_plan\n"
        "cfg = compose_config('model=xgen_7b', 'hardware=tpu_v4_8', 'serve.max_batch=8')\n"
        "print(json.dumps(_generate_plan(cfg, Runtime.of(cfg, devices=topology_devices(cfg.hardware)))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    g = json.loads(proc.stdout.strip().splitlines()[-1])
    assert g["batch"] == 8 and g["slots"] == 8192 and g["kv_cache_dtype"] == "bfloat16"
    params_per_chip = 6_895_702_016 * 4 / 8
    caches_per_chip = 8 * 32 * 2 * 4096 * 8192 * 2 / 8  # rows x layers x (k, v) x kv width x slots x bf16
    assert params_per_chip + caches_per_chip <= g["hbm_per_chip_bytes"] < 32 * 2**30


@pytest.mark.slow
@needs_libtpu
def test_a_context_parallel_step_compiles_for_a_tpu_v4_slice(tmp_path):
    """Sequences split over 4 chips (gathered keys under shard_map, zigzag order) with scanned,
    rematerialized layers and splash on each chip's rows of the mask tables: libtpu compiles
    the Pallas kernels for a v4-8 and the step fits."""
    plan = plan_cli(
        tmp_path, "model=tiny", "stage=s1_2k", "stage.seq_len=8192", "stage.batch_tokens=16384", "hardware=tpu_v4_8",
        "hardware.mesh.fsdp=2", "hardware.mesh.context=4", "execution=tpu_splash", "plan.generate=false",
    )  # fmt: skip
    assert plan["method"].startswith("compiled for v4:2x2x2 (TPU v4) by XLA (splash") and plan["fits"]
    assert 0 < plan["hbm_per_chip_bytes"] < 2 * 2**30
