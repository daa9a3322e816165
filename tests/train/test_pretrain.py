import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import compose_config
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_five_step_cpu_run_writes_config_metrics_checkpoint_and_summary(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "trainer.steps=5", "trainer.log_every=2", "debug=fast", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    for r in records:
        assert {"step", "loss", "learning_rate", "grad_norm", "tokens_seen", "tokens_per_s"} <= set(r)
        assert r["tokens_seen"] == r["step"] * 128
    assert (tmp_path / "checkpoints" / "5" / "state").is_dir()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["final_loss"] == records[-1]["loss"]
    log = proc.stdout + proc.stderr
    assert "step 5/5" in log and "ETA" in log and "tok/s" in log


def test_default_recipe_loss_falls_clearly():
    cfg = compose_config("trainer.steps=50", "trainer.log_every=50")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run_task(cfg, Path(d))
        records = read_metrics(Path(d))
    assert records[0]["step"] == 1 and records[-1]["step"] == 50
    assert records[-1]["loss"] < records[0]["loss"] - 2.0


def test_rerunning_in_the_same_run_dir_resumes_bit_identically(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    # The same 6-step schedule in both; the resumed run stops after 3 steps, then is run again.
    common = ("trainer.log_every=1", "optimizer.decay_steps=6", "debug=fast")
    run_task(compose_config("trainer.steps=6", *common), straight)
    run_task(compose_config("trainer.steps=3", *common), resumed)
    summary = run_task(compose_config("trainer.steps=6", *common), resumed)
    assert summary["steps_this_run"] == 3
    want = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(straight)}
    got = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(resumed)}
    assert got == want  # exact float equality, steps 1-6

    again = run_task(compose_config("trainer.steps=6", *common), resumed)
    assert again["steps_this_run"] == 0


def test_training_with_document_masking_logs_epochs(tmp_path):
    run_task(compose_config("trainer.steps=2", "data_mix.document_masking=true", "debug=fast"), tmp_path)
    records = read_metrics(tmp_path)
    assert records[-1]["step"] == 2
    assert set(records[-1]["data_epochs"]) == {"python_docs", "python_stdlib"}
