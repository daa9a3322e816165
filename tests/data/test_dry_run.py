import gzip
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError, RawInputConfig
from xgen.data.estimate import plan_mix, plan_source, stored_sizes
from xgen.data.inputs import expand_paths
from xgen.data.readers import read_documents
from xgen.data.synthetic import write_corpus
from xgen.tasks.prepare import run
from xgen.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data_dir holding the synthetic raw corpus only (the dry runs below must leave it so)."""
    root = tmp_path_factory.mktemp("dry_run")
    write_corpus(root / "synthetic" / "raw")
    return root


def config(data_dir: Path, *overrides: str):
    return compose_config("data_mix=synthetic", f"data_dir={data_dir}", "prepare.dry_run=true", "prepare.workers=0", *overrides)


def true_tokens(spec: RawInputConfig) -> int:
    tok, total = Tokenizer.xgen(), 0
    for f in expand_paths(spec.paths).files:
        texts = [text for text, _ in read_documents(f.path, spec, Counter(), f.parts)]
        total += sum(map(len, tok.encoding.encode_ordinary_batch(texts, num_threads=1)))
    return total


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k != "timing"}
    return value


def test_the_dry_run_writes_a_plan_with_the_sizes_on_disk_and_prepares_nothing(data_dir, tmp_path):
    cfg = config(data_dir)
    returned = run(cfg, tmp_path)
    plan = json.loads((tmp_path / "prepare_plan.json").read_text())
    assert plan == json.loads(json.dumps(returned))
    assert set(plan["sources"]) == {"natural_language", "code"}
    for name, folder in (("natural_language", "prose"), ("code", "code")):
        files = sorted((data_dir / "synthetic" / "raw" / folder).iterdir())
        source = plan["sources"][name]
        assert source["files"] == len(files) and source["units"] == len(files)
        assert source["bytes"] == sum(os.stat(f).st_size for f in files)
        assert source["estimated_tokens"] > 0 and source["timing"]["stored_bytes_per_s_per_core"] > 0
    assert plan["total"]["bytes"] == sum(s["bytes"] for s in plan["sources"].values())
    assert [h["cores"] for h in plan["timing"]["hours"]] == [1, 64, 512]
    assert all(h["hours"] > 0 for h in plan["timing"]["hours"])
    assert plan["timing"]["cpu"]
    assert not (data_dir / "synthetic" / "prepared").exists()
    assert not list(data_dir.rglob("manifest.json")) and not list(data_dir.rglob("*.array_record*"))
    assert not (tmp_path / "prepare.json").exists()


def test_the_token_estimate_is_near_the_true_count_even_from_small_samples(data_dir):
    cfg = config(data_dir, "prepare.sample_bytes=20000")
    plan = plan_mix(cfg.data_mix, cfg.prepare, Tokenizer.xgen())
    for name, source in plan["sources"].items():
        truth = true_tokens(cfg.data_mix.sources[name].raw)
        assert 0.5 * truth <= source["estimated_tokens"] <= 2 * truth, (name, source["estimated_tokens"], truth)
        assert source["estimated_tokens_kept"] <= source["estimated_tokens"]
    # The gzip file was read in part: fewer stored bytes than it holds, more text than that.
    # (zstd decodes in blocks of up to 128 KiB, so the small .zst file is read whole.)
    prose = {Path(f["path"]).name: f for f in plan["sources"]["natural_language"]["sample_files"]}
    gz = prose["part-1.jsonl.gz"]
    assert gz["sampled_stored_bytes"] < gz["bytes"] < gz["text_bytes"]
    # A sample holding every file whole counts every token.
    whole = plan_mix(config(data_dir).data_mix, config(data_dir).prepare, Tokenizer.xgen())
    assert whole["sources"]["natural_language"]["estimated_tokens"] == true_tokens(cfg.data_mix.sources["natural_language"].raw)


def test_a_json_lines_file_bigger_than_split_bytes_counts_as_several_units(data_dir):
    cfg = config(data_dir, "prepare.split_bytes=100000")
    plan = plan_mix(cfg.data_mix, cfg.prepare, Tokenizer.xgen())
    code = data_dir / "synthetic" / "raw" / "code" / "python.jsonl"
    assert plan["sources"]["code"]["units"] == math.ceil(code.stat().st_size / 100000) > 10
    # part-0.jsonl (over 100 kB) is cut in two; the compressed and text files stay whole.
    prose = sorted((data_dir / "synthetic" / "raw" / "prose").iterdir())
    assert plan["sources"]["natural_language"]["units"] == len(prose) + 1
    assert plan["total"]["units"] == plan["sources"]["code"]["units"] + len(prose) + 1


def test_two_dry_runs_agree_on_everything_but_the_measured_speed(data_dir):
    cfg = config(data_dir, "prepare.sample_bytes=30000")
    first, second = (plan_mix(cfg.data_mix, cfg.prepare, Tokenizer.xgen()) for _ in range(2))
    assert without_timing(first) == without_timing(second)
    assert first["timing"]["cpu"] == second["timing"]["cpu"]


def test_a_source_matching_no_file_is_the_one_line_config_error_of_prepare(data_dir, tmp_path):
    cfg = config(data_dir, f"data_mix.sources.code.raw.paths=[{tmp_path}/nothing/*.jsonl]")
    with pytest.raises(ConfigError, match=r"^data_mix.sources.code.raw.paths \[.*\] match no file$"):
        run(cfg, tmp_path)
    assert not (tmp_path / "prepare_plan.json").exists()


def test_parquet_and_json_arrays_stand_for_the_fraction_of_their_records_read(data_dir, tmp_path):
    pytest.importorskip("pyarrow")
    star = data_dir / "synthetic" / "raw" / "starcoder"
    rows = [json.loads(line) for f in sorted(star.glob("*.jsonl")) for line in f.read_text().splitlines()]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    for pattern in (str(star / "*.parquet"), str(tmp_path / "rows.json")):
        spec = RawInputConfig(paths=[pattern], text_field="content")
        cfg = config(data_dir, "prepare.sample_bytes=2000")
        source = plan_source("starcoder", spec, cfg.prepare, Tokenizer.xgen(), 100)
        truth = true_tokens(spec)
        assert 0.5 * truth <= source["estimated_tokens"] <= 2 * truth, (pattern, source["estimated_tokens"], truth)
        assert all(f["sampled_stored_bytes"] < f["bytes"] for f in source["sample_files"]), source["sample_files"]


def test_files_behind_a_url_are_sized_by_the_filesystem_and_sampled_through_it(data_dir):
    prose = (data_dir / "synthetic" / "raw" / "prose" / "part-0.jsonl").read_bytes()
    mem = fsspec.filesystem("memory")
    mem.pipe_file("/dry-run-test/a.jsonl.gz", gzip.compress(prose))
    mem.pipe_file("/dry-run-test/b.jsonl", prose)
    try:
        urls = ["memory://dry-run-test/a.jsonl.gz", "memory://dry-run-test/b.jsonl"]
        assert stored_sizes(urls) == [len(gzip.compress(prose)), len(prose)]
        spec = RawInputConfig(paths=["memory://dry-run-test/*"], text_field="text")
        source = plan_source("remote", spec, config(data_dir).prepare, Tokenizer.xgen(), 100)
        assert source["files"] == 2 and source["bytes"] == sum(stored_sizes(urls))
        assert source["estimated_tokens"] == 2 * true_tokens(RawInputConfig(paths=[urls[1]], text_field="text"))
    finally:
        mem.rm("/dry-run-test", recursive=True)


def test_the_command_line_dry_run_prints_the_table_and_writes_the_plan(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["task=prepare", "prepare.dry_run=true", "data_mix=synthetic", f"data_dir={data_dir}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([sys.executable, "-m", "xgen.run", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr
    for expected in ("source", "files", "units", "GB", "est. tokens", "tokens/stored byte", "natural_language", "code", "total"):
        assert expected in out, out
    assert "linear extrapolation from one core of this machine" in out and "512 cores" in out, out
    assert json.loads((run_dir / "prepare_plan.json").read_text())["sources"]["code"]["files"] == 1
    assert not (data_dir / "synthetic" / "prepared").exists()
