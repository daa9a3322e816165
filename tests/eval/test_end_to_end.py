"""Issue 7's "done when": on a tiny *trained* model and the shipped fixtures, every benchmark
in conf/eval runs end to end, and task=report gathers them (with the carbon footprint of the
training run) into one page in the report's order."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.eval.fake_judge import FakeJudge
from xgen.eval.fixtures.__main__ import main as write_fixtures
from xgen.objective import objective
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(p.stem for p in (REPO / "conf" / "eval").glob("*.yaml"))
# Small enough for 2 CPU cores: few items, short answers, a 256-token context.
QUICK = (
    "eval.limit=2", "eval.max_new_tokens=8", "eval.n_samples=2", "eval.min_tokens=200", "generate.max_len=256",
    "eval.batch_size=4", "eval.passkey_lengths=[96,200]", "eval.passkey_depths=[0,1]", "eval.passkey_trials=2",
)  # fmt: skip
# Benchmarks that read no files (passkey builds its prompts): nothing to check before the model.
NO_DATA = {"passkey"}
SECTIONS = {
    "mmlu_5shot": "Table 4: MMLU 5-shot",
    "mmlu_0shot": "Table 5: MMLU zero-shot",
    "zeroshot": "Table 6: zero-shot common-sense tasks",
    "humaneval": "Table 7: HumanEval",
    "ppl_by_position": "Figure 2: perplexity by token position",
    "passkey": "Passkey retrieval by prompt length and depth",
    "alpaca_eval": "Table 8: AlpacaEval",
    "mt_bench": "Tables 9 and 10: MT-Bench",
    "longform_qa": "Tables 11 and 12: long-form QA",
    "summarization": "Table 13: dialogue summarization",
}


@pytest.mark.slow
def test_every_benchmark_runs_on_a_trained_tiny_model_and_the_report_gathers_them(tmp_path):
    assert set(BENCHMARKS) == set(SECTIONS), "a new conf/eval file needs a place in the report"
    trained = tmp_path / "pretrain"
    fast = ("stage.seq_len=32", "stage.batch_tokens=128", "data_mix.sources.python_stdlib.max_documents=20")
    run_task(compose_config("trainer.steps=3", *fast), trained)
    data_dir = tmp_path / "data"
    write_fixtures([str(data_dir)])

    outputs = tmp_path / "outputs"
    with FakeJudge() as judge:
        for name in BENCHMARKS:
            run_dir = outputs / name
            run_dir.mkdir(parents=True)
            overrides = (
                "task=eval", f"eval={name}", f"checkpoint={trained}", f"data_dir={data_dir}", *QUICK,
                f"eval.judge.base_url={judge.url}", f"eval.judge.cache_dir={tmp_path / 'judge_cache'}",
            )  # fmt: skip
            result = run_task(compose_config(*overrides), run_dir)
            assert result["benchmark"] == name and (run_dir / f"{name}.md").read_text().startswith("| ")
            assert json.loads((run_dir / f"{name}.json").read_text())["checkpoint"] == str(trained)
            assert math.isfinite(objective("eval", result))  # its headline, what a sweep over it optimizes
        assert len(judge.bodies) > 0
    carbon = compose_config("task=carbon", f"run_dir={trained}", "carbon.chip_power_w=100", "carbon.pue=1.0")
    (outputs / "carbon").mkdir()
    run_task(carbon, outputs / "carbon")

    page = run_task(compose_config("task=report", f"run_dir={outputs}"), tmp_path / "report")
    text = page.read_text()
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    order = ["mmlu_5shot", "mmlu_0shot", "zeroshot", "humaneval", "ppl_by_position", "passkey", "alpaca_eval", "mt_bench",
             "longform_qa", "summarization"]  # fmt: skip
    assert headings == [SECTIONS[n] for n in order] + ["Section 6: carbon footprint"]
    assert f"| {trained.name} |" in text  # the model's row in the tables
    assert "![Figure 2: perplexity by token position](ppl_by_position/ppl_by_position.png)" in text
    assert (outputs / "ppl_by_position" / "ppl_by_position.png").read_bytes().startswith(b"\x89PNG")
    assert "![Passkey retrieval by prompt length and depth](passkey/passkey.png)" in text


@pytest.mark.parametrize("name", sorted(set(BENCHMARKS) - NO_DATA))
def test_each_benchmark_names_its_missing_data_before_loading_a_model(name, tmp_path):
    from xgen.config import ConfigError

    (tmp_path / "no_model").mkdir()  # loading it would fail: data must be checked first
    cfg = compose_config("task=eval", f"eval={name}", f"checkpoint={tmp_path / 'no_model'}", f"data_dir={tmp_path}")
    with pytest.raises(ConfigError) as ex:
        run_task(cfg, tmp_path)
    message = str(ex.value)
    assert "\n" not in message and str(tmp_path) in message and "no_model" not in message, message
