"""eval=zeroshot against lm-evaluation-harness itself (issue 15): a small trained model, its
Hugging Face export scored by lm-eval's `hf` backend on the same local files (lm-eval's own
task YAMLs, with only the dataset pointed at them), and xgen's scores of the xgen checkpoint.
Every per-request log-likelihood agrees to 1e-4 and every accuracy exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import compose_config

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

# xgen task -> (lm-eval tasks, their YAML under lm_eval/tasks, the split xgen and lm-eval read)
TASKS = {
    "arc_challenge": ({"arc_challenge": "arc/arc_challenge.yaml"}, "test"),
    "hellaswag": ({"hellaswag": "hellaswag/hellaswag.yaml"}, "validation"),
    "winogrande": ({"winogrande": "winogrande/default.yaml"}, "validation"),
    "truthfulqa_mc": ({"truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml"}, "validation"),
    "boolq": ({"boolq": "super_glue/boolq/default.yaml"}, "validation"),
    "piqa": ({"piqa": "piqa/piqa.yaml"}, "validation"),
    "openbookqa": ({"openbookqa": "openbookqa/openbookqa.yaml"}, "test"),
}  # fmt: skip


def task_yamls(include_dir: Path, data: Path) -> list[str]:
    """One YAML per lm-eval task: `include:` lm-eval's own file, then only the dataset moved
    to the local JSON Lines file, as the one split the task evaluates (the others unset)."""
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    include_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for xgen_task, (lm_tasks, split) in TASKS.items():
        for name, rel in lm_tasks.items():
            text = (
                f"include: {tasks_root / rel}\n"
                f"task: xgen_{name}\n"
                "tag: []\n"
                "dataset_path: json\n"
                "dataset_name: null\n"
                f"dataset_kwargs:\n  data_files:\n    {split}: {data / xgen_task / f'{split}.jsonl'}\n"
                "training_split: null\n"  # zero-shot: no split to draw examples from
                + ("validation_split: null\n" if split == "test" else "test_split: null\n")
            )
            (include_dir / f"xgen_{name}.yaml").write_text(text)
            names.append(f"xgen_{name}")
    return names


@pytest.mark.slow
def test_zeroshot_equals_lm_eval_hf_backend_request_by_request(tmp_path, monkeypatch):
    from xgen.eval.fixtures.zeroshot import write as write_zeroshot
    from xgen.hf import export_checkpoint
    from xgen.tasks import run_task

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    run = tmp_path / "trained"
    run.mkdir()
    run_task(compose_config("trainer.steps=20", "stage.seq_len=64", "stage.batch_tokens=512", "trainer.log_every=10"), run)
    hf_dir = export_checkpoint(run, tmp_path / "hf")
    data = write_zeroshot(tmp_path / "data")

    (tmp_path / "xgen_eval").mkdir()
    xgen = run_task(
        compose_config("task=eval", "eval=zeroshot", f"checkpoint={run}", f"data_dir={tmp_path / 'data'}", "eval.batch_size=4"),
        tmp_path / "xgen_eval",
    )
    records = [json.loads(line) for line in (tmp_path / "xgen_eval" / "zeroshot_partial.jsonl").read_text().splitlines()]
    xgen_lls = {r["_id"]: r["result"]["lls"] for r in records}

    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = task_yamls(tmp_path / "lm_eval_tasks", data)
    out = simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=names, device="cpu", batch_size=1,
        task_manager=TaskManager(include_path=str(tmp_path / "lm_eval_tasks")), log_samples=True,
    )  # fmt: skip

    compared = 0
    for xgen_task, (lm_tasks, _) in TASKS.items():
        offsets: dict[int, int] = {}  # TruthfulQA: xgen's row holds MC1's requests, then MC2's
        for name in lm_tasks:
            for s in out["samples"][f"xgen_{name}"]:
                theirs = [float(r[0][0]) for r in s["resps"]]
                start = offsets.get(s["doc_id"], 0)
                ours = xgen_lls[f"{xgen_task}/{s['doc_id']}"][start : start + len(theirs)]
                assert ours == pytest.approx(theirs, abs=1e-4), (name, s["doc_id"])
                offsets[s["doc_id"]] = start + len(theirs)
                compared += len(theirs)
        assert {d: len(xgen_lls[f"{xgen_task}/{d}"]) for d in offsets} == offsets  # no request more or fewer
        ours = xgen["tasks"][xgen_task]
        for name in lm_tasks:
            theirs = out["results"][f"xgen_{name}"]
            for metric in ("acc", "acc_norm"):
                if f"{metric},none" in theirs and metric in ours:
                    assert ours[metric] == theirs[f"{metric},none"], (name, metric)
        if xgen_task == "truthfulqa_mc":
            assert ours["mc1"] == out["results"]["xgen_truthfulqa_mc1"]["acc,none"]
            assert ours["mc2"] == pytest.approx(out["results"]["xgen_truthfulqa_mc2"]["acc,none"], abs=1e-6)
    assert compared > 50, compared
