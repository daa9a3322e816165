import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.data import prepare as prepare_module
from xgen.data.prepare import prepare_source
from xgen.data.store import ShardStore
from xgen.data.synthetic import write_corpus
from xgen.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]


def manifest(data_dir: Path, source: str) -> dict:
    return json.loads((data_dir / "synthetic" / "prepared" / source / "manifest.json").read_text())


def test_manifest_counts_documents_tokens_shards_drops_and_errors(synthetic_data):
    m = manifest(synthetic_data, "natural_language")
    t = m["totals"]
    assert m["tokenizer"]["identity"] == Tokenizer.xgen().identity and m["min_doc_tokens"] == 100
    assert t["files"] == 8 and t["shards"] >= 6 and t["documents"] > 300
    for kind in ("dropped_short", "empty_files", "corrupt_files", "invalid_utf8", "malformed_json", "missing_field"):
        assert t[kind] >= 1, kind
    store = ShardStore(synthetic_data / "synthetic" / "prepared" / "natural_language", Tokenizer.xgen())
    assert len(store) == t["documents"] and int(store.lengths.sum()) == t["tokens"]
    assert store.lengths.min() >= 100


def test_shards_hold_the_ordinary_encoding_of_each_document(synthetic_data):
    store = ShardStore(synthetic_data / "synthetic" / "prepared" / "starcoder", Tokenizer.xgen())
    text = Tokenizer.xgen().decode(store.tokens(0))
    assert text.startswith(("int f", "function f", "func f", "fn f"))
    assert set(store.meta) == {"language", "license", "repository"}
    m = manifest(synthetic_data, "starcoder")
    assert sum(m["totals"]["tokens_by"]["language"].values()) == m["totals"]["tokens"]


def test_data_from_another_tokenizer_is_refused_in_one_line(synthetic_data, tmp_path):
    src = synthetic_data / "synthetic" / "prepared" / "code"
    copy = tmp_path / "code"
    copy.mkdir()
    m = json.loads((src / "manifest.json").read_text())
    m["tokenizer"]["identity"] = "gpt2-0123456789abcdef"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="tokenized with tokenizer gpt2-0123456789abcdef"):
        ShardStore(copy, Tokenizer.xgen())


def all_documents(out: Path) -> list[tuple[str, bytes]]:
    store = ShardStore(out, Tokenizer.xgen())
    return sorted((store.meta["source"][i], store.tokens(i).tobytes()) for i in range(len(store)))


def test_an_interrupted_prepare_resumes_without_losing_or_duplicating(tmp_path, monkeypatch):
    raw = write_corpus(tmp_path / "raw")
    cfg = compose_config("data_mix=synthetic", f"data_dir={tmp_path}", "prepare.workers=0", "prepare.shard_tokens=5000", "prepare.batch_documents=8")
    spec = cfg.data_mix.sources["natural_language"].raw
    spec.paths = [str(raw / "prose" / "*")]
    tok = Tokenizer.xgen()
    clean = prepare_source("nl", tmp_path / "clean", spec, tok, 100, cfg.prepare)

    real_read = prepare_module.read_documents

    def crash_in_part_1(path, spec, counts):
        for i, doc in enumerate(real_read(path, spec, counts)):
            if path.endswith("part-1.jsonl.gz") and i == 60:
                raise KeyboardInterrupt("killed mid-file")
            yield doc

    monkeypatch.setattr(prepare_module, "read_documents", crash_in_part_1)
    with pytest.raises(KeyboardInterrupt):
        prepare_source("nl", tmp_path / "resumed", spec, tok, 100, cfg.prepare)
    # empty, latin1, mixed-quality and part-0 were committed before the kill.
    assert len(json.loads((tmp_path / "resumed" / "manifest.json").read_text())["files"]) == 4
    assert list((tmp_path / "resumed" / "shards").glob("*.tmp"))  # the cut file's partial shards
    monkeypatch.setattr(prepare_module, "read_documents", real_read)
    resumed = prepare_source("nl", tmp_path / "resumed", spec, tok, 100, cfg.prepare)

    assert resumed == clean
    assert not list((tmp_path / "resumed" / "shards").glob("*.tmp"))
    assert all_documents(tmp_path / "resumed") == all_documents(tmp_path / "clean")


def test_prepare_task_with_worker_processes_then_training_on_the_shards(tmp_path):
    write_corpus(tmp_path / "synthetic" / "raw")
    common = ["data_mix=synthetic", f"data_dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=prepare", *common, "prepare.workers=2", f"hydra.run.dir={tmp_path}/p"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    totals = json.loads((tmp_path / "p" / "prepare.json").read_text())
    assert totals["natural_language"]["documents"] > 300 and totals["code"]["documents"] > 100
    train = [
        "stage=s1_2k", "model=tiny", "trainer.steps=3", "stage.batch_tokens=4096", f"hydra.run.dir={tmp_path}/t",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", *common, *train], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and np.isfinite(records[-1]["loss"])
    assert set(records[-1]["data_epochs"]) == {"natural_language", "code"}
