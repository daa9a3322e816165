import json

import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.tasks import run_task


def test_plot_draws_every_stage_of_a_pretrain_all_run(tmp_path):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "run"
    for k, stage in enumerate(("s1_2k", "s2_4k", "s3_8k")):
        (runs / stage).mkdir(parents=True)
        lines = [{"step": k * 10 + i, "loss": 10 - k - i / 10, "tokens_seen": (k * 10 + i) * 4096} for i in range(1, 11)]
        (runs / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "plot"
    out.mkdir()
    png = run_task(compose_config("task=plot", f"run_dir={runs}"), out)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_names_a_directory_without_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        run_task(compose_config("task=plot", f"run_dir={tmp_path}"), tmp_path)
