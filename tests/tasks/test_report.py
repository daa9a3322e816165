"""task=report: results of several eval and carbon runs on one page, in the report's order,
with runs of one benchmark merged into one table and figures linked relative to the page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.eval.mmlu import markdown_table
from xgen.tasks.carbon import footprint
from xgen.tasks.report import merge_tables, run


def _mmlu_run(run_dir: Path, name: str, checkpoint: str, shots: int, average: float) -> None:
    run_dir.mkdir(parents=True)
    cats = {c: {"correct": 1, "questions": 2, "accuracy": 0.5} for c in ("STEM", "humanities")}
    result = {"benchmark": name, "kind": "mmlu", "checkpoint": checkpoint, "shots": shots, "categories": cats, "average": average}
    (run_dir / f"{name}.json").write_text(json.dumps(result))
    (run_dir / f"{name}.md").write_text(markdown_table(result, Path(checkpoint).name))


def test_runs_are_gathered_in_the_reports_order_and_merged_per_benchmark(tmp_path):
    root = tmp_path / "outputs"
    _mmlu_run(root / "a", "mmlu_0shot", "/ckpt/xgen-8k", 0, 0.25)
    _mmlu_run(root / "b", "mmlu_5shot", "/ckpt/xgen-4k", 5, 0.375)
    _mmlu_run(root / "c" / "deeper", "mmlu_5shot", "/ckpt/xgen-8k", 5, 0.5)
    (root / "d").mkdir()
    carbon = {"chip_hours": 270336, "chip_hours_source": "given", "chip_power_w": 192, "pue": 1.1, "tco2_per_mwh": 0.079}
    (root / "d" / "carbon.json").write_text(json.dumps({**carbon, **footprint(270336, 192, 1.1, 0.079)}))
    ppl = root / "e"
    ppl.mkdir()
    (ppl / "ppl_by_position.json").write_text(json.dumps({"benchmark": "ppl_by_position", "kind": "ppl_by_position"}))
    (ppl / "ppl_by_position.md").write_text("| Models | 1-2 |\n| --- | --- |\n| xgen-8k | 9.0 |\n")
    (ppl / "ppl_by_position.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "f").mkdir()
    (root / "f" / "broken.json").write_text("{not json")  # skipped with a warning
    (root / "f" / "summary.json").write_text(json.dumps({"wall_s": 3}))  # a training run's: not a result

    page = run(compose_config("task=report", f"run_dir={root}"), tmp_path / "report_run")
    assert page == root.resolve() / "report.md"
    text = page.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Table 4: MMLU 5-shot",
        "## Table 5: MMLU zero-shot",
        "## Figure 2: perplexity by token position",
        "## Section 6: carbon footprint",
    ]
    table4 = text.split("## Table 4")[1].split("## Table 5")[0]
    rows = [line for line in table4.splitlines() if line.startswith("| xgen")]
    assert rows == ["| xgen-4k | 50.0 | 50.0 | - | - | 37.5 |", "| xgen-8k | 50.0 | 50.0 | - | - | 50.0 |"]
    assert "![Figure 2: perplexity by token position](e/ppl_by_position.png)" in text
    assert "| Energy (MWh) | 57.095 |" in text and "| Emissions (tCO2eq) | 4.511 |" in text
    assert "Source: `b/mmlu_5shot.json`, `c/deeper/mmlu_5shot.json`" in text


def test_tables_of_different_layouts_are_kept_whole():
    a = "| M | x |\n| --- | --- |\n| m1 | 1 |\n"
    b = "| M | y |\n| --- | --- |\n| m2 | 2 |\n"
    assert merge_tables([a, b]) == a + "\n" + b
    two = "| M | x |\n| --- | --- |\n| m1 | 1 |\n\nper category\n| C | x |\n| --- | --- |\n| m1 | 3 |\n"
    other = two.replace("m1", "m2")
    merged = merge_tables([two, other])
    assert merged.count("| M | x |") == 1 and "| m1 | 1 |\n| m2 | 1 |" in merged and "| m1 | 3 |\n| m2 | 3 |" in merged


def test_a_directory_without_results_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="needs run_dir="):
        run(compose_config("task=report"), tmp_path)
    with pytest.raises(ConfigError, match="no such directory"):
        run(compose_config("task=report", f"run_dir={tmp_path / 'nope'}"), tmp_path)
    with pytest.raises(ConfigError, match="no evaluation results"):
        run(compose_config("task=report", f"run_dir={tmp_path}"), tmp_path)
