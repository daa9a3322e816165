"""Evaluation inside the loop: the held-out loss and the log-likelihood benchmarks at step N
equal what the checkpoint of step N gives offline; a profile of the steps asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.eval.fixtures.mmlu import write_mmlu
from xgen.eval.fixtures.zeroshot import write_zeroshot
from xgen.tasks import run_task

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run evaluating every 2 steps: held-out loss, zeroshot and MMLU 0-shot."""
    root = tmp_path_factory.mktemp("inloop")
    data = root / "data"
    write_zeroshot(data / "zeroshot")
    write_mmlu(data / "mmlu")
    run_dir = root / "run"
    run_dir.mkdir()
    overrides = (
        "debug=fast", f"trainer.steps={STEPS}", "trainer.eval_every=2", "trainer.eval_tasks=[zeroshot,mmlu_0shot]",
        "trainer.eval_tasks_every=2", f"data_dir={data}", "generate.max_len=256", "trainer.checkpoint_every=2",
        "trainer.checkpoints_to_keep=2", "trainer.profile_steps=[2,3]",
    )  # fmt: skip
    run_task(compose_config("task=pretrain", *overrides), run_dir)
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return root, run_dir, overrides, {r["step"]: r for r in records}


def test_the_held_out_loss_and_benchmarks_are_logged_every_n_steps(trained):
    _, run_dir, _, records = trained
    assert sorted(records) == [2, 4]
    for record in records.values():
        assert np.isfinite(record["heldout/loss"]) and record["heldout/python_docs/loss"] > 0
        assert 0.0 <= record["zeroshot/hellaswag/acc_norm"] <= 1.0 and 0.0 <= record["mmlu_0shot/average"] <= 1.0
    assert records[2]["heldout/loss"] != records[4]["heldout/loss"]  # the model changed between them
    goodput = json.loads((run_dir / "goodput.json").read_text())
    assert goodput["seconds"]["eval"] > 0


def test_the_held_out_loss_equals_the_loss_of_the_last_checkpoint_on_the_held_out_batches(trained):
    from xgen.data import build_pipeline
    from xgen.model.loss import loss_fn
    from xgen.runtime import Runtime
    from xgen.tokenizer import Tokenizer

    _, run_dir, overrides, records = trained
    cfg = compose_config("task=pretrain", *overrides)
    pipeline = build_pipeline(cfg.data_mix, cfg.stage, Tokenizer.xgen(), loader=cfg.loader)
    runtime = Runtime.of(cfg)
    params = runtime.restore_params(run_dir / "checkpoints")  # the newest: the last step's
    total = count = 0.0
    for name, batches in pipeline.heldout_batches(cfg.trainer.eval_batches).items():
        s = sum(float(loss_fn(params, runtime.graphdef, b)) * float(b["loss_mask"].sum()) for b in batches)
        n = sum(float(b["loss_mask"].sum()) for b in batches)
        assert records[STEPS][f"heldout/{name}/loss"] == pytest.approx(s / n, rel=1e-5)
        total, count = total + s, count + n
    assert records[STEPS]["heldout/loss"] == pytest.approx(total / count, rel=1e-5)


def test_the_in_loop_benchmarks_equal_task_eval_on_the_checkpoint_of_the_same_step(trained):
    """task=eval on the run's final checkpoint (step 4): every metric the loop logged at
    step 4 is the offline one."""
    root, run_dir, _, records = trained
    common = (f"checkpoint={run_dir}", f"data_dir={root / 'data'}", "generate.max_len=256")
    zs = run_task(compose_config("task=eval", "eval=zeroshot", *common), _fresh(root / "zs"))
    mm = run_task(compose_config("task=eval", "eval=mmlu_0shot", *common), _fresh(root / "mm"))
    logged = records[STEPS]
    for task, entry in zs["tasks"].items():
        for metric, value in entry.items():
            if metric != "items" and not metric.endswith("_stderr"):
                assert logged[f"zeroshot/{task}/{metric}"] == value, (task, metric)
    assert logged["mmlu_0shot/average"] == mm["average"]
    assert {k.split("/")[1] for k in logged if k.startswith("mmlu_0shot/") and k != "mmlu_0shot/average"} == set(mm["categories"])


def test_profile_steps_write_a_trace_tensorboard_and_perfetto_read(trained):
    _, run_dir, _, _ = trained
    xplanes = list((run_dir / "profile").glob("plugins/profile/*/*.xplane.pb"))
    perfetto = list((run_dir / "profile").glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert len(xplanes) == 1 and xplanes[0].stat().st_size > 0
    assert len(perfetto) == 1 and perfetto[0].stat().st_size > 0


def test_eval_tasks_that_cannot_run_in_the_loop_are_refused_in_one_line():
    from xgen.config import ConfigError
    from xgen.config.validate import validate

    with pytest.raises(ConfigError, match="trainer.eval_tasks: humaneval cannot run in the loop; the log-likelihood"):
        validate(compose_config("trainer.eval_tasks=[humaneval]", "trainer.eval_tasks_every=5"))
    with pytest.raises(ConfigError, match=r"trainer.profile_steps=\[3\] must be \[first, last\]"):
        validate(compose_config("trainer.profile_steps=[3]"))


def _fresh(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
